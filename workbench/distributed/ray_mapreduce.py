"""Map a function over work items (typically a store's shards) as Ray tasks, results in order.

The analysis keeps its reduction on the driver and folds the per-item results in item order, the
order a local loop adds them in: a float sum is then the same sum, and the Ray result equals the
local one exactly when both use one torch thread (a task has num_cpus=1). With more local threads
torch splits each shard's own sum differently, and the two differ in the last bit (~1e-16
relative: a std of 0.013289554769071753 against ...754 on the tiny test model). Only small partial results travel (a few vectors per
shard); the shards themselves are read by the workers from the shared filesystem.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from workbench.distributed.ray_engine import check_workers, connect, required_packages

MAX_RETRIES = 3  # a task whose worker died is rerun (the map functions are pure reads)
IN_FLIGHT_PER_CPU = 2  # bounded queue: memory on the driver stays a few results per worker


def map_ordered(
    fn: Callable[..., Any],
    items: Sequence[tuple],
    address: str | None = None,
    needed: Sequence[tuple[str, str]] = (),
) -> Iterator[Any]:
    """Yield `fn(*item)` for each item, in item order, computed by Ray tasks (one CPU each) on the
    cluster at `address` (or one started here). `needed` (label, path) must exist on every node."""
    import ray

    from workbench.distributed.ray_capture import _get

    connect(address)
    check_workers(needed, required_packages(""))
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(fn)
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)) * IN_FLIGHT_PER_CPU)
    queue, pending = deque(items), deque()
    while queue or pending:
        while queue and len(pending) < limit:
            pending.append(task.remote(*queue.popleft()))
        yield _get(pending.popleft())
