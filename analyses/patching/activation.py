"""Activation patching (the ground truth): run the base prompts with one component replaced by its
value from the source prompts, and record the change of the metric.

Denoising: base = corrupted, source = clean. Noising: base = clean, source = corrupted
(Zhang & Nanda 2023). TransformerLens' `patching` module does one forward pass per component;
here many patches share one forward pass: the base batch is repeated K times and the k-th copy
carries the k-th patch (batch rows never interact, so each copy is exactly its own patched run).
A patch whose source value equals the base value bit for bit (e.g. every position before the
first token where clean and corrupted differ, at every layer, by causality) changes nothing:
its effect is exactly 0 and it is not run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int

from workbench.analyses.patching.components import Patch
from workbench.interventions import hooked


def sweep(
    model,
    base_tokens: Int[torch.Tensor, "batch pos"],
    source: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    patch_list: list[Patch],
    metric: Callable,
    base_values: Float[torch.Tensor, " batch"],
    max_rows: int,
    points: dict | None = None,
    progress: Callable[[int], None] | None = None,
    skip_identical: bool = True,
) -> tuple[Float[torch.Tensor, "patch batch"], int]:
    """Effect of each patch on each prompt (metric(patched) - metric(base)), and the model calls made.

    `source`/`base`: hook name -> activation [batch, pos, ...] of the source and base runs.
    `max_rows`: most batch rows per forward pass (patches x prompts). `skip_identical=False` runs
    even the patches that replace a value by itself (benchmarks: batching alone).
    """
    b = base_tokens.shape[0]
    effects = torch.zeros(len(patch_list), b)
    todo = [
        i
        for i, p in enumerate(patch_list)
        if not (skip_identical and _same(source[p.hook], base[p.hook], p.index))
    ]
    per_call = max(1, max_rows // b)
    calls = 0
    for start in range(0, len(todo), per_call):
        chunk = todo[start : start + per_call]
        values = _patched_values(model, base_tokens, source, [patch_list[i] for i in chunk], metric, points)
        effects[chunk] = values.view(len(chunk), b) - base_values
        calls += 1
        if progress:
            progress(len(chunk))
    if progress and len(todo) < len(patch_list):
        progress(len(patch_list) - len(todo))
    return effects, calls


def _same(src: torch.Tensor, dst: torch.Tensor, index: tuple) -> bool:
    return torch.equal(src[(slice(None), *index)], dst[(slice(None), *index)])


def _patched_values(model, base_tokens, source, chunk: list[Patch], metric, points) -> torch.Tensor:
    """One forward pass of len(chunk) copies of the base batch, copy k patched by chunk[k]."""
    b = base_tokens.shape[0]
    by_hook: dict[str, list[tuple[int, Patch]]] = {}
    for k, patch in enumerate(chunk):
        by_hook.setdefault(patch.hook, []).append((k, patch))

    def make_hook(name: str):
        def hook(x, hook):
            x = x.clone()
            for k, patch in by_hook[name]:
                x[(slice(k * b, (k + 1) * b), *patch.index)] = source[name][(slice(None), *patch.index)]
            return x

        return hook

    tokens = base_tokens.repeat(len(chunk), 1)
    rows = torch.arange(b).repeat(len(chunk))
    with torch.no_grad(), hooked(model, fwd=[(n, make_hook(n)) for n in by_hook], points=points):
        logits = model(tokens, return_type="logits")
    return metric(logits[:, -1], rows)
