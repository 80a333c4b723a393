"""Scale-out on Ray: captures split into shard jobs, dictionary sweeps as tasks, and analyses
mapped over a store's shards. Ray is imported only here, and only when `--engine ray` is asked for.

- `ray_engine`: connect to a cluster (or start one on this machine) and check every node first.
- `ray_capture`: one store written by several actors; the driver commits each shard.
- `ray_sweep`: several `train-sae` runs as Ray tasks, each cached as it finishes.
- `ray_mapreduce`: `Context.map` on Ray: per-shard partial results, reduced on the driver.
"""
