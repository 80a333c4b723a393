"""Map-reduce on a real local Ray cluster: activation-stats mapped over the store's shards as Ray
tasks and reduced on the driver equals the local run with the same torch thread count exactly (the
reduction adds the per-shard partial sums in shard order, the order the local loop adds them in)."""

from __future__ import annotations

import pytest
import torch
from ray_cluster import ray_cluster  # noqa: F401 - the module's cluster fixture, used by name

from workbench import api
from workbench.distributed import ray_mapreduce


@pytest.mark.usefixtures("ray_cluster")
def test_activation_stats_on_ray_equals_local(tiny_store, monkeypatch):
    store = tiny_store(("blocks.*.hook_resid_post", "blocks.0.mlp.hook_post"), 3072)
    assert store.n_shards("blocks.0.hook_resid_post") == 3  # several partial results to reduce
    # One torch thread, as a Ray task has (num_cpus=1): torch splits a float64 sum over its threads,
    # so with 2 threads a shard's own sum ends in another last bit (std 0.013289554769071753 vs
    # ...754 seen here); with the same threads the shard order below makes the results equal.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = api.run("activation-stats", store=str(store.root))
    finally:
        torch.set_num_threads(threads)

    mapped = []  # items the Ray map computed, to show the run did go through Ray
    real = ray_mapreduce.map_ordered

    def counting(fn, items, **kw):
        for out in real(fn, items, **kw):
            mapped.append(fn.__name__)
            yield out

    monkeypatch.setattr(ray_mapreduce, "map_ordered", counting)
    on_ray = api.run("activation-stats", store=str(store.root), engine="ray", force=True)
    n_work = sum(store.n_shards(s) for s in store.sites)
    assert mapped == ["shard_moments"] * n_work + ["shard_fires"] * n_work
    assert on_ray.cache_key == local.cache_key  # one result, whichever engine computed it
    assert on_ray.table == local.table  # float for float, not approximately
    assert on_ray.n_tokens == local.n_tokens
    assert on_ray.firing_rate.keys() == local.firing_rate.keys()
    for site, rate in local.firing_rate.items():
        assert torch.equal(on_ray.firing_rate[site], rate), site
