"""A sweep: one analysis (typically `train-sae`) over several configs, each run as a Ray task.

Each task is an ordinary `workbench.api.run` in a Ray worker, writing to the same results cache
(on a filesystem every node sees): a finished run is a cache hit for the CLI, the app and
Jupyter at once, a run that was cached already costs nothing, and a task rerun after its worker
died resumes from the run's own checkpoint (train-sae keeps one in its work folder).
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
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


def grid(name: str, vary: Sequence[str], fixed: Sequence[str] = ()) -> list[dict]:
    """A sweep's configs from `NAME=V1,V2,...` items (one run per value; several items give their
    product) and `NAME=VALUE` items shared by every run; values typed as the option's field."""
    base = {key: values[0] for key, values in (_option(name, item, many=False) for item in fixed)}
    axes = [_option(name, item, many=True) for item in vary]
    combos = itertools.product(*(values for _, values in axes))
    return [{**base, **{key: v for (key, _), v in zip(axes, combo)}} for combo in combos]


def _option(name: str, item: str, many: bool) -> tuple[str, list]:
    from workbench import analysis

    cls = analysis.get(name).config_cls
    hints = typing.get_type_hints(cls)
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"'{item}' is not NAME=VALUE with NAME an option of {name} (e.g. k=16,32)")
    kind = hints[key] if hints[key] in (int, float, bool) else str
    values = []
    for part in text.split(",") if many else [text]:
        try:
            values.append(
                part.strip().lower() in ("1", "true", "yes") if kind is bool else kind(part.strip())
            )
        except ValueError:
            raise ValueError(
                f"{key} takes {kind.__name__} values, got '{part.strip()}' in '{item}'"
            ) from None
    return key, values


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
