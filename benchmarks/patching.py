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
    """(median wall s, median process CPU s, last output): CPU time is the steadier figure on a
    shared machine, where wall time depends on what else runs."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def sample_cells(n_layers: int, n_pos: int, k: int) -> list[tuple[int, int, int]]:
    """k (block type, layer, pos) cells per block type, spread over layers, positions from the end."""
    return [(b, (i * 7) % n_layers, n_pos - 1 - (i % 6)) for b in range(len(BLOCK)) for i in range(k)]


def tl_module(model, tt, base: dict, cells) -> tuple[list[float], float, float]:
    """TransformerLens' `patching.generic_activation_patch` (what get_act_patch_block_every runs per
    block type) on the sampled cells: effects M(patched) - M(corrupted), wall s, CPU s."""
    import pandas as pd
    import torch
    from transformer_lens import patching

    g = tt.groups[0]
    metric = _tl_metric(g, base)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(g.clean)
        m_corr = metric(model(g.corrupted))
    setter = patching.layer_pos_patch_setter
    out, t, c = [], time.perf_counter(), time.process_time()
    for b, name in enumerate(BLOCK):
        rows = [(layer, pos) for bb, layer, pos in cells if bb == b]
        df = pd.DataFrame(rows, columns=["layer", "pos"])
        with torch.no_grad():
            vals = patching.generic_activation_patch(
                model, g.corrupted, clean_cache, metric, setter, name, index_df=df
            )
        out += [float(v - m_corr) for v in vals]
    return out, time.perf_counter() - t, time.process_time() - c


def tl_algorithm(model, tt, base: dict, cells) -> tuple[list[float], float, float]:
    """The same algorithm without the module: one plain `run_with_hooks` forward per component."""
    import torch

    g = tt.groups[0]
    metric = _tl_metric(g, base)
    with torch.no_grad():
        _, cache = model.run_with_cache(g.clean)
        m_corr = metric(model(g.corrupted))
    out, t, c = [], time.perf_counter(), time.process_time()
    for b, layer, pos in cells:
        name = f"blocks.{layer}.hook_{BLOCK[b]}"

        def hook(x, hook, name=name, pos=pos):
            x[:, pos] = cache[name][:, pos]
            return x

        with torch.no_grad():
            out.append(float(metric(model.run_with_hooks(g.corrupted, fwd_hooks=[(name, hook)])) - m_corr))
    return out, time.perf_counter() - t, time.process_time() - c


def _tl_metric(g, base: dict):
    ld_clean, ld_corr = base["ld_clean"], base["ld_corrupted"]

    def metric(logits):
        last = logits[:, -1]
        ld = last.gather(-1, g.answer[:, None]) - last.gather(-1, g.wrong[:, None])
        return ((ld[:, 0] - ld_corr) / (ld_clean - ld_corr)).mean()

    return metric


def costs(ap: float, tl: float, alg: float, atp: float, relp: float, scale: float) -> dict:
    """One clock's times; TL's were taken on sampled components and are scaled to the full sweep."""
    return {
        "ap_ours_full_sweep": ap,
        "ap_tl_module_full_sweep_extrapolated": tl * scale,
        "ap_tl_algorithm_full_sweep_extrapolated": alg * scale,
        "atp": atp,
        "relp": relp,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3, help="AtP/RelP timing repeats (median)")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--sample", type=int, default=6, help="TL side: components timed per block type")
    args = ap.parse_args()
    import torch

    from workbench.analyses.patching.compute import run_task
    from workbench.models import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_model(args.model)
    tt = one_template_task(model, args.prompts)
    T = tt.groups[0].clean.shape[1]
    rows = max(1, args.max_batch_tokens // T)
    t_atp, c_atp, atp = timed(lambda: run_task(model, tt, options(model, ("atp",))), args.repeats)
    t_relp, c_relp, _ = timed(lambda: run_task(model, tt, options(model, ("relp",))), args.repeats)
    t_ap, c_ap, ours = timed(lambda: run_task(model, tt, options(model, ("ap",), max_rows=rows)))
    mine = torch.stack([ours.scores[f"ap/{c}"].mean(0) for c in BLOCK])  # [3, layer, pos]
    cells = sample_cells(model.cfg.n_layers, T, args.sample)
    theirs, t_tl, c_tl = tl_module(model, tt, atp.baselines, cells)
    plain, t_alg, c_alg = tl_algorithm(model, tt, atp.baselines, cells)
    at_cells = torch.tensor([float(mine[b, layer, pos]) for b, layer, pos in cells])
    n_all, n_cells = mine.numel(), len(cells)
    report = {
        "model": args.model,
        "prompts": args.prompts,
        "tokens_per_prompt": T,
        "components": n_all,
        "sampled_components": n_cells,
        "load_average": os.getloadavg()[0],
        "wall_s": costs(t_ap, t_tl, t_alg, t_atp, t_relp, n_all / n_cells),
        "cpu_s": costs(c_ap, c_tl, c_alg, c_atp, c_relp, n_all / n_cells),
        "max_abs_diff_vs_tl_module": float((at_cells - torch.tensor(theirs)).abs().max()),
        "max_abs_diff_vs_tl_algorithm": float((at_cells - torch.tensor(plain)).abs().max()),
        "max_abs_effect_on_sampled_cells": float(at_cells.abs().max()),
        "ld_clean": atp.baselines["ld_clean"],
        "ld_corrupted": atp.baselines["ld_corrupted"],
    }
    for kind in ("wall_s", "cpu_s"):
        x = report[kind]
        report[kind.replace("_s", "_ratios")] = {
            "tl_module_over_ours": x["ap_tl_module_full_sweep_extrapolated"] / x["ap_ours_full_sweep"],
            "tl_algorithm_over_ours": x["ap_tl_algorithm_full_sweep_extrapolated"] / x["ap_ours_full_sweep"],
            "relp_over_atp": x["relp"] / x["atp"],
            "ap_over_relp": x["ap_ours_full_sweep"] / x["relp"],
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
