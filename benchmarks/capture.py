"""Capture cost versus the bare forward pass, and versus TransformerLens run_with_cache in memory.

Same model, same tokens, one process, modes interleaved (these machines are noisy: only ratios
measured side by side mean anything). Peak memory is measured per mode in a fresh subprocess.

    python benchmarks/capture.py --tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from workbench.capture import CaptureConfig, capture
from workbench.data import pack
from workbench.models import load_model
from workbench.sites import resolve_sites

SITES = ("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post")
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw-test/wiki.test.raw"


def batches(model, data: str, n_tokens: int, ctx_len: int, batch_size: int) -> list[torch.Tensor]:
    seqs = [s.tokens for _, s in zip(range(n_tokens // ctx_len), pack(data, model.tokenizer, ctx_len))]
    return [torch.tensor(seqs[i : i + batch_size]) for i in range(0, len(seqs), batch_size)]


def bare_forward(model, data, args) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches(model, data, args.tokens, args.ctx_len, args.batch_size):
            model(batch, return_type=None)
    return time.perf_counter() - start


def blocks_forward(model, data, args) -> float:
    """The forward pass through the last block only: the compute a capture of block sites needs
    (it skips the final norm and the unembedding), so capture / this is the storage overhead."""
    last = model.hook_dict[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]

    def stop(act, hook):
        raise StopAtLayerException(act)

    last.add_hook(stop, level=-7002)
    try:
        return bare_forward(model, data, args)
    finally:
        last.remove_hooks("fwd", level=-7002)


def store_capture(model, data, args) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-store-"))
    cfg = CaptureConfig(
        model=args.model,
        sites=SITES,
        data=data,
        n_tokens=args.tokens,
        ctx_len=args.ctx_len,
        batch_size=args.batch_size,
        shard_tokens=args.shard_tokens,
        dtype=args.dtype,
    )
    start = time.perf_counter()
    capture(cfg, model=model, out=out, progress=False)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed


def run_with_cache_in_memory(model, data, args) -> float:
    names = set(resolve_sites(SITES, model.hook_dict))
    kept = []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches(model, data, args.tokens, args.ctx_len, args.batch_size):
            _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
            kept.append({k: v for k, v in cache.items()})
    return time.perf_counter() - start


MODES = {
    "forward": bare_forward,
    "forward_blocks": blocks_forward,
    "capture": store_capture,
    "run_with_cache": run_with_cache_in_memory,
}


def peak_rss_mb(mode: str, args) -> dict[str, float]:
    """Peak RSS of a fresh process that loads the model and runs one mode once: overall, and the
    peak while the mode ran above the RSS it started from (the model loaded)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--tokens",
        str(args.tokens),
        "--model",
        args.model,
        "--ctx-len",
        str(args.ctx_len),
        "--batch-size",
        str(args.batch_size),
        "--shard-tokens",
        str(args.shard_tokens),
        "--data",
        args.data,
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reset_peak_rss() -> float:
    """Linux: restart the high-water mark at the current RSS (clear_refs 5); returns that RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(WIKITEXT))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per mode (subprocesses)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = load_model(args.model)
    if args.child:
        start = _reset_peak_rss()
        MODES[args.child](model, args.data, args)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"peak_rss_mb": peak, "added_mb": _status_mb("VmHWM") - start}))
        return
    bare_forward(model, args.data, args)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode, fn in MODES.items():
            times[mode].append(fn(model, args.data, args))
    med = {m: statistics.median(t) for m, t in times.items()}
    print(
        f"model={args.model} tokens={args.tokens} ctx={args.ctx_len} batch={args.batch_size} dtype={args.dtype} "
        f"sites={len(resolve_sites(SITES, model.hook_dict))} torch_threads={torch.get_num_threads()}"
    )
    for mode in MODES:
        print(
            f"{mode:>15}: median {med[mode]:.2f}s  ({args.tokens / med[mode]:.0f} tok/s)  runs {[round(t, 2) for t in times[mode]]}"
        )
    print(f"capture / forward = {med['capture'] / med['forward']:.3f}")
    print(f"capture / forward through the blocks only = {med['capture'] / med['forward_blocks']:.3f}")
    print(f"run_with_cache / forward = {med['run_with_cache'] / med['forward']:.3f}")
    if args.memory:  # flat in the token budget: compare N and 2N tokens per mode
        for mode in ("forward", "capture", "run_with_cache"):
            small = peak_rss_mb(mode, args)
            big = peak_rss_mb(mode, argparse.Namespace(**{**vars(args), "tokens": 2 * args.tokens}))
            print(
                f"peak RSS {mode:>15}: {small['peak_rss_mb']:.0f} MB at {args.tokens} tokens, "
                f"{big['peak_rss_mb']:.0f} MB at {2 * args.tokens} tokens; while running, above the "
                f"loaded model: +{small['added_mb']:.0f} MB, +{big['added_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
