"""A sweep: one analysis (typically `train-sae`) over several configs, each run as a Ray task.

Each task is an ordinary `workbench.api.run` in a Ray worker, writing to the same results cache
(on a filesystem every node sees): a finished run is a cache hit for the CLI, the app and
Jupyter at once, a run that was cached already costs nothing, and a task rerun after its worker
died resumes from the run's own checkpoint (train-sae keeps one in its work folder).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.distributed.ray_engine import check_workers, connect, required_packages

MAX_RETRIES = 3  # a task whose worker died is rerun; the analysis resumes from its checkpoint


@dataclass(frozen=True)
class SweepRun:
    """One finished run of a sweep: its overrides and the cache key of its result."""

    overrides: dict
    key: str


def check_configs(name: str, configs: Sequence[dict]) -> list[str]:
    """Build each config and its cache key here, before any task starts: a bad option or a missing
    store is one line now, not a failed task later. Returns the keys."""
    from workbench import api

    if not configs:
        raise ValueError(f"a sweep of {name} needs at least one config")
    return [api.key_for(name, api.make_config(name, **c)) for c in configs]


def sweep_on_ray(
    name: str,
    configs: Sequence[dict],
    address: str | None = None,
    on_done: Callable[[SweepRun], None] | None = None,
) -> list[SweepRun]:
    """Run `name` once per config as Ray tasks (one CPU each); `on_done` is called as each
    finishes (its result is then in the cache). Returns the runs in config order."""
    import ray

    from workbench import paths
    from workbench.distributed.ray_capture import _get

    check_configs(name, configs)
    connect(address)
    home = str(paths.home().resolve())
    stores = {str(c["store"]) for c in configs if c.get("store")}
    needed = [("the workbench home", home), *(("the store", s) for s in sorted(stores))]
    check_workers(needed, required_packages(""))
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_run_one)
    pending = {task.remote(name, dict(c), home): i for i, c in enumerate(configs)}
    runs: dict[int, SweepRun] = {}
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready)
        runs[i] = SweepRun(dict(configs[i]), _get(ready))
        if on_done is not None:
            on_done(runs[i])
    return [runs[i] for i in range(len(configs))]


def _run_one(name: str, overrides: dict, home: str) -> str:
    """In a Ray worker: the ordinary cached run, in the driver's workbench home."""
    import os

    os.environ["WORKBENCH_HOME"] = home  # task workers are pooled: set it for every task
    from workbench import api

    return api.run(name, progress=_quiet, **overrides).cache_key


def _quiet(done: int, total: int) -> Any:
    """No progress bars from the workers; the driver reports each run as it finishes."""
    return None
