"""One dictionary end to end: trained while capturing (`sae.follow.capture_and_train`) vs SAELens'
`LanguageModelSAETrainingRunner`, same TopK SAE, same tokens, one run each, same process.

Ours: the capture of one site runs in a thread and writes the fp16 store while the training
thread follows its committed shards. SAELens: the runner from `benchmarks/train_sae.py` (the
booted TransformerBridge as `override_model`, the same packed WikiText-2 rows as
`override_dataset`; it runs the model for every training batch). Model loading is excluded for
both. Ours scales inputs by √d / E‖x‖ (measured on the first shard) and starts b_dec at the
first shard's mean; the SAELens side runs as `benchmarks/train_sae.py` configures it.

    flock /tmp/lead/heavy.lock .venv/bin/python benchmarks/train_while_capture.py --tokens 32768 --batch 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _train_sae_bench():
    spec = importlib.util.spec_from_file_location("bench_train_sae", HERE / "train_sae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(model, args, site: str, data: str) -> dict:
    from workbench.capture import CaptureConfig
    from workbench.sae.follow import capture_and_train

    cfg = CaptureConfig(
        model=model.workbench.key,
        sites=(site,),
        data=data,
        n_tokens=args.tokens,
        ctx_len=128,
        dtype="float16",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    out = capture_and_train(
        cfg, d_sae=8 * 576, k=32, batch_size=args.batch, lr=3e-4, steps=args.tokens // args.batch, model=model
    )
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    n = out.steps * args.batch
    return {
        "tokens": n,
        "seconds": dt,
        "cpu_s": dc,
        "capture_s": out.capture_seconds,
        "waited_s": out.waited_seconds,
        "follow_batches": out.follow_batches,
        "end_to_end_tok_s": n / dt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    bench = _train_sae_bench()  # sets HF_HUB_OFFLINE; its isolated home and SAELens runner
    bench.isolated_home()
    import torch

    from workbench.context import POOL
    from workbench.data import default_source
    from workbench.models import load_model

    data = str(HERE.parents[1] / "shared" / "data" / "wikitext-2-raw-test" / "wiki.test.raw")
    data = data if Path(data).exists() else default_source()
    site = f"blocks.{args.layer}.hook_resid_post"
    model = load_model("smollm2-135m")
    POOL.put(model)
    out = {"threads": torch.get_num_threads(), "site": site, "batch": args.batch}
    out["ours_train_while_capturing"] = ours(model, args, site, data)
    print(json.dumps(out, default=float), flush=True)  # kept if SAELens' side runs out of time
    out["saelens"] = bench.saelens(model, args, site, data)
    o, s = out["ours_train_while_capturing"], out["saelens"]
    out["speedup_end_to_end"] = s["seconds"] / o["seconds"]
    out["cpu_speedup_end_to_end"] = s["cpu_s"] / o["cpu_s"]
    print(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
