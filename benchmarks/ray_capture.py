"""Ray capture versus the local capture of the same job, and 2 workers x 1 thread versus 1 worker x
2 threads, on the real smollm2-135m (run under the heavy lock; one run, these machines are noisy).

    flock /tmp/lead/heavy.lock python benchmarks/ray_capture.py --tokens 8192

Each mode writes a fresh store of the same config and is deleted afterwards. Times:
- local: `load_model` + `capture` in this process (2 torch threads; torch already imported);
- local CLI: `workbench capture` of the same config in a fresh process (imports included);
- ray total: `capture_on_ray` from call to return on a started cluster (actor processes start,
  import torch/TransformerLens and load the model: the fixed cost of a Ray job);
- ray shards: from the first shard sent to the store marked complete (`_Driver.go`, which also
  packs the text once to count its sequences), the part that scales with the token budget.
The local capture loop is compared with "ray shards": the overhead Ray adds per token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from workbench.capture import CaptureConfig, capture
from workbench.distributed import ray_capture
from workbench.models import load_model

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw-test/wiki.test.raw"


def local(cfg: CaptureConfig, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model(cfg.model, cfg.processing)
    loaded = time.perf_counter()
    store = capture(cfg, model=model, out=out, progress=False)
    end = time.perf_counter()
    return {"load_s": loaded - start, "capture_s": end - loaded, "total_s": end - start, "rows": store.n_rows}


def local_cli(cfg: CaptureConfig, out: Path) -> dict:
    """`workbench capture` in a fresh process: what a user waits for, imports included (the fair
    comparison for "ray total", whose actors also start fresh processes)."""
    args = [
        sys.executable,
        "-m",
        "workbench.cli",
        "capture",
        "--model",
        cfg.model,
        "--sites",
        ",".join(cfg.sites),
    ]
    args += ["--data", cfg.data, "--n-tokens", str(cfg.n_tokens), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return {"total_s": time.perf_counter() - start}


def on_ray(cfg: CaptureConfig, out: Path, workers: int, threads: int) -> dict:
    spans = {}
    go = ray_capture._Driver.go

    def timed_go(self, n_seqs):  # the shard phase: actors are up, the model loaded
        spans["start"] = time.perf_counter()
        go(self, n_seqs)
        spans["end"] = time.perf_counter()

    ray_capture._Driver.go = timed_go
    try:
        start = time.perf_counter()
        store = ray_capture.capture_on_ray(cfg, out=out, workers=workers, threads=threads, progress=False)
        end = time.perf_counter()
    finally:
        ray_capture._Driver.go = go
    return {
        "startup_s": spans["start"] - start,
        "shards_s": spans["end"] - spans["start"],
        "total_s": end - start,
        "rows": store.n_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sites", default="blocks.*.mlp.hook_post,blocks.*.hook_resid_post")
    args = parser.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    cfg = CaptureConfig(model=args.model, sites=args.sites, data=str(WIKITEXT), n_tokens=args.tokens)
    root = Path(tempfile.mkdtemp(prefix="ray-bench-", dir=Path.home() / ".cache"))
    start = time.perf_counter()
    ray_capture.connect(None, num_cpus=2)
    results = {
        "ray_init_s": round(time.perf_counter() - start, 1),
        "tokens": args.tokens,
        "sites": args.sites,
    }
    try:
        for name, run in (
            ("local 1 process x 2 threads", lambda out: local(cfg, out, 2)),
            ("local CLI, fresh process", lambda out: local_cli(cfg, out)),
            ("ray 1 worker x 2 threads", lambda out: on_ray(cfg, out, 1, 2)),
            ("ray 2 workers x 1 thread", lambda out: on_ray(cfg, out, 2, 1)),
        ):
            out = root / name.replace(" ", "_")
            results[name] = {k: round(v, 2) for k, v in run(out).items()}
            print(name, results[name], flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    base = results["local 1 process x 2 threads"]
    one, two = results["ray 1 worker x 2 threads"], results["ray 2 workers x 1 thread"]
    results["overhead_shards"] = round(one["shards_s"] / base["capture_s"], 3)
    results["overhead_total_vs_cli"] = round(
        one["total_s"] / results["local CLI, fresh process"]["total_s"], 3
    )
    results["two_by_one_over_one_by_two_throughput"] = round(one["shards_s"] / two["shards_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
