"""One patching run over a tokenized task: caches, baselines, then each method on each length group.

Scores are per prompt: [n_prompts, *map_shape] per (method, component). Positions of groups of
different lengths are aligned at the end (the answer position) in maps n_pos wide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workbench.analyses.patching import components as comp
from workbench.analyses.patching.activation import sweep
from workbench.analyses.patching.attribution import EMBED, gradients, integrated_gradients
from workbench.analyses.patching.metrics import PromptMetric, logit_diff
from workbench.interventions import hook_points, hooked, model_lock
from workbench.tasks import Group, TokenizedTask

METHODS = ("ap", "atp", "relp", "ig")
DIRECTIONS = ("denoise", "noise")


@dataclass
class Options:
    components: tuple[str, ...]
    methods: tuple[str, ...]
    heads: list[tuple[int, int]]
    metric: str = "normalized"
    direction: str = "denoise"
    ig_steps: int = 8
    relp_rules: tuple[str, ...] = ("norm", "identity", "half")
    relp_ah: bool = False
    max_rows: int = 256
    skip_identical: bool = True  # AP: patches that replace a value by an identical one are exact no-ops


@dataclass
class Cache:
    """Activations [batch, pos, ...] at every needed hook and final-position logits, one group."""

    clean: dict[str, torch.Tensor]
    corrupted: dict[str, torch.Tensor]
    clean_last: torch.Tensor  # [batch, vocab]
    corrupted_last: torch.Tensor


@dataclass
class Outcome:
    scores: dict[str, torch.Tensor]  # "method/component" -> [n_prompts, *map_shape]
    baselines: dict[str, float]
    cost: dict[str, dict[str, float]]
    per_prompt_baselines: dict[str, list[float]] = field(default_factory=dict)


def run_task(model, tt: TokenizedTask, opt: Options, step: Callable[[str], None] | None = None) -> Outcome:
    """Every method of `opt` on every group of `tt`; `step(desc)` is called after each unit of work."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_pos = max(g.clean.shape[1] for g in tt.groups)
    hooks = sorted({comp.HOOKS[c].format(layer) for c in opt.components for layer in range(n_layers)})
    points = hook_points(model, hooks + [EMBED])
    cost = {m: {"wall_s": 0.0, "forward": 0, "backward": 0, "calls": 0} for m in opt.methods}
    with model_lock(model):
        t0 = time.perf_counter()
        caches = [_cache(model, g, hooks, points) for g in tt.groups]
        for m in opt.methods:  # every method needs the clean and corrupted runs
            cost[m].update(wall_s=time.perf_counter() - t0, forward=2, calls=len(caches))
        base = _baselines(tt.groups, caches)
        scores = {
            f"{m}/{c}": torch.zeros(len(tt.pairs), *comp.map_shape(c, n_layers, n_heads, n_pos))
            for m in opt.methods
            for c in opt.components
        }
        for g, cache in zip(tt.groups, caches):
            metric = _metric(opt.metric, g, cache, base)
            for m in opt.methods:
                t = time.perf_counter()
                got, calls = _method(model, m, g, cache, metric, hooks, points, opt)
                cost[m]["wall_s"] += time.perf_counter() - t
                cost[m]["calls"] += calls
                _place(scores, m, got, g, n_pos, opt, n_layers)
                if step:
                    step(m)
    for m in opt.methods:
        cost[m].update(_passes(m, opt, scores, n_layers))
    return Outcome(scores, base, cost)


def _cache(model, g: Group, hooks: list[str], points: dict) -> Cache:
    """Clean and corrupted runs in one batch, keeping every hook's activation (and the embedding)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(x, hook):
            acts[name] = x.detach().clone()
            return None

        return hook

    b = g.clean.shape[0]
    with torch.no_grad(), hooked(model, fwd=[(n, keep(n)) for n in hooks + [EMBED]], points=points):
        logits = model(torch.cat([g.clean, g.corrupted]), return_type="logits")[:, -1].float()
    clean = {n: a[:b] for n, a in acts.items()}
    corrupted = {n: a[b:] for n, a in acts.items()}
    return Cache(clean, corrupted, logits[:b], logits[b:])


def _baselines(groups: list[Group], caches: list[Cache]) -> dict[str, float]:
    ld_clean = torch.cat([logit_diff(c.clean_last, g.answer, g.wrong) for g, c in zip(groups, caches)])
    ld_corr = torch.cat([logit_diff(c.corrupted_last, g.answer, g.wrong) for g, c in zip(groups, caches)])
    return {"ld_clean": float(ld_clean.mean()), "ld_corrupted": float(ld_corr.mean())}


def _metric(name: str, g: Group, cache: Cache, base: dict[str, float]) -> PromptMetric:
    return PromptMetric(
        name, g.answer, g.wrong, cache.clean_last.log_softmax(-1), base["ld_clean"], base["ld_corrupted"]
    )


def _method(model, method, g: Group, cache: Cache, metric, hooks, points, opt: Options):
    """hook or patch -> per-prompt scores of one method on one group, and the model calls made."""
    denoise = opt.direction == "denoise"
    tokens = g.corrupted if denoise else g.clean
    src, dst = (cache.clean, cache.corrupted) if denoise else (cache.corrupted, cache.clean)
    rows = torch.arange(tokens.shape[0])
    if method == "ap":
        base_last = cache.corrupted_last if denoise else cache.clean_last
        base_values = metric(base_last, rows)
        n_pos = tokens.shape[1]
        patch_list = [
            p for c in opt.components for p in comp.patches(c, model.cfg.n_layers, n_pos, opt.heads)
        ]
        effects, calls = sweep(
            model,
            tokens,
            src,
            dst,
            patch_list,
            metric,
            base_values,
            opt.max_rows,
            points,
            skip_identical=opt.skip_identical,
        )
        return dict(zip(patch_list, effects.unbind(0))), calls
    if method == "ig":
        grads, calls = integrated_gradients(
            model, tokens, dst[EMBED], src[EMBED], hooks, metric, opt.ig_steps, opt.max_rows, points
        )
    elif method == "relp":
        from workbench import lrp

        with lrp.rules(model, opt.relp_rules, ah=opt.relp_ah):
            grads, calls = gradients(model, tokens, hooks, metric, rows, points=points), 1
    else:
        grads, calls = gradients(model, tokens, hooks, metric, rows, points=points), 1
    return {h: (src[h] - dst[h]) * grads[h] for h in hooks}, calls


def _place(scores, method: str, got: dict, g: Group, n_pos: int, opt: Options, n_layers: int) -> None:
    """Write one group's per-prompt scores into the task-wide maps (positions end-aligned)."""
    idx = torch.tensor(g.index)
    offset = n_pos - g.clean.shape[1]
    for c in opt.components:
        target = scores[f"{method}/{c}"]
        if method == "ap":
            for patch, eff in got.items():
                if patch.component == c:
                    target[(idx, *comp.map_index(patch, offset))] = eff
            continue
        for layer in range(n_layers):
            red = comp.reduce_score(c, got[comp.HOOKS[c].format(layer)])  # [batch, pos] / [batch, head] / ...
            if c == "heads":
                keep = torch.tensor([h for lay, h in opt.heads if lay == layer], dtype=torch.long)
                target[idx[:, None], layer, keep] = red[:, keep]
            elif c == "heads_pos":
                keep = torch.tensor([h for lay, h in opt.heads if lay == layer], dtype=torch.long)
                target[idx[:, None], layer, keep, offset:] = red[:, keep]
            else:
                target[idx, layer, offset:] = red


def _passes(method: str, opt: Options, scores, n_layers: int) -> dict[str, int]:
    """Forward/backward passes over the task's prompts (a batched call of k copies counts k)."""
    if method == "ap":
        n = sum(scores[f"ap/{c}"][0].numel() for c in opt.components if c not in comp.PER_HEAD)
        n += sum(
            len(opt.heads) * (scores["ap/heads_pos"].shape[-1] if c == "heads_pos" else 1)
            for c in opt.components
            if c in comp.PER_HEAD
        )
        return {"forward": 2 + n, "backward": 0}
    if method == "ig":
        return {"forward": 2 + opt.ig_steps, "backward": opt.ig_steps}
    return {"forward": 3, "backward": 1}
