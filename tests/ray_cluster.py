"""A real local Ray cluster for the Ray tests: started once per test module, dashboard and usage
statistics off, shut down afterwards even when a test fails. It is asked for 127.0.0.1, but Ray
2.60 resolves that to the machine's reachable address by design (`resolve_ip_for_localhost`) and
guards its ports with token authentication; nothing in these tests leaves this machine."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no network calls from the workers
    os.environ["RAY_worker_niceness"] = "0"  # Ray's default 15 starves the workers on a busy machine
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
