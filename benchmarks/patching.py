"""Patching cost, side by side in one run on smollm2-135m (raw numerics), same prompts for all:

* our full AP sweep (resid_pre / attn_out / mlp_out x layer x position, denoising, normalised
  metric) vs TransformerLens' own `patching.get_act_patch_block_every` on the same Bridge (one
  forward pass per component), with the max abs difference of the two maps;
* ours with batching only (identical-value patches run too), to separate the two speed-ups;
* RelP cost / AtP cost (each including its clean + corrupted runs) and AP time / RelP time.

    .venv/bin/python benchmarks/patching.py --prompts 4 --repeats 3

Prompts: IOI templates, one template (one token length, as TL's function needs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BLOCK = ("resid_pre", "attn_out", "mlp_out")


def one_template_task(model, n: int):
    """n IOI pairs of template 0 (ABBA/BABA alternating), tokenized as one length group."""
    from workbench import tasks

    pairs = [p for i, p in enumerate(tasks.ioi_templates(8 * n, seed=0)) if (i // 2) % 4 == 0][:n]
    task = tasks.Task("ioi-template-0", pairs, "bench")
    tt = tasks.tokenize(task, model)
    assert len(tt.groups) == 1, "pairs of one template share one length"
    return tt


def options(model, methods, **kw):
    from workbench.analyses.patching.compute import Options

    return Options(components=BLOCK, methods=methods, heads=[], metric="normalized", **kw)


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def tl_sweep(model, tt, base: dict):
    """TransformerLens' own block sweep on the Bridge: [3, layer, pos] of M(patched) - M(corrupted)."""
    import torch
    from transformer_lens import patching

    g = tt.groups[0]
    ld_clean, ld_corr = base["ld_clean"], base["ld_corrupted"]

    def metric(logits):
        last = logits[:, -1]
        ld = last.gather(-1, g.answer[:, None]) - last.gather(-1, g.wrong[:, None])
        return ((ld[:, 0] - ld_corr) / (ld_clean - ld_corr)).mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(g.clean)
        m_corr = metric(model(g.corrupted))
        out = patching.get_act_patch_block_every(model, g.corrupted, clean_cache, metric)
    return out - m_corr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="AtP/RelP timing repeats (median)")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    import torch

    from workbench.analyses.patching.compute import run_task
    from workbench.models import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_model("smollm2-135m")
    tt = one_template_task(model, args.prompts)
    T = tt.groups[0].clean.shape[1]
    rows = max(1, args.max_batch_tokens // T)
    t_atp, atp = timed(lambda: run_task(model, tt, options(model, ("atp",))), args.repeats)
    t_relp, _ = timed(lambda: run_task(model, tt, options(model, ("relp",))), args.repeats)
    t_ap, ours = timed(lambda: run_task(model, tt, options(model, ("ap",), max_rows=rows)))
    t_batch, plain = timed(
        lambda: run_task(model, tt, options(model, ("ap",), max_rows=rows, skip_identical=False))
    )
    t_tl, theirs = timed(lambda: tl_sweep(model, tt, atp.baselines))
    mine = torch.stack([ours.scores[f"ap/{c}"].mean(0) for c in BLOCK])  # [3, layer, pos]
    batched = torch.stack([plain.scores[f"ap/{c}"].mean(0) for c in BLOCK])
    report = {
        "model": "smollm2-135m",
        "prompts": args.prompts,
        "tokens_per_prompt": T,
        "components": int(mine.numel()),
        "ap_ours_s": round(t_ap, 2),
        "ap_ours_batching_only_s": round(t_batch, 2),
        "ap_transformer_lens_s": round(t_tl, 2),
        "speedup_vs_tl": round(t_tl / t_ap, 2),
        "speedup_batching_only": round(t_tl / t_batch, 2),
        "max_abs_diff_vs_tl": float((mine - theirs.cpu()).abs().max()),
        "max_abs_diff_batching_only_vs_tl": float((batched - theirs.cpu()).abs().max()),
        "atp_s": round(t_atp, 3),
        "relp_s": round(t_relp, 3),
        "relp_over_atp": round(t_relp / t_atp, 3),
        "ap_over_relp": round(t_ap / t_relp, 1),
        "ld_clean": round(atp.baselines["ld_clean"], 4),
        "ld_corrupted": round(atp.baselines["ld_corrupted"], 4),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
