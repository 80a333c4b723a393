"""Average indirect effects by token type (ROME `notebooks/average_causal_effects.ipynb`).

Token types of a prompt with subject span [start, end) and n tokens: first subject token, middle
subject tokens (mean; none for subjects of 1-2 tokens), last subject token, first subsequent token,
further tokens (mean, excluding the last token) and the last token. A type a prompt lacks is left
out of that type's average. AIE = mean over facts of IE = P_restored - P_corrupted; the 95 % CI
half-width is 1.96 * sd / sqrt(n) over the facts that have the type.
"""

from __future__ import annotations

import math

import torch

TOKEN_TYPES = (
    "first subject",
    "middle subject",
    "last subject",
    "first subsequent",
    "further tokens",
    "last token",
)


def type_positions(start: int, end: int, n: int) -> list[list[int]]:
    """Positions of each token type (an empty list: the prompt has no token of that type)."""
    after = list(range(end, n))
    return [
        [start],
        list(range(start + 1, end - 1)),
        [end - 1],
        after[:1] if after and after[0] != n - 1 else [],
        [p for p in after[1:] if p != n - 1],
        [n - 1],
    ]


def by_type(ie: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[kind, layer, pos] indirect effects -> [kind, type, layer] (NaN where the prompt lacks the type)."""
    kinds, layers, n = ie.shape
    out = torch.full((kinds, len(TOKEN_TYPES), layers), float("nan"))
    for t, pos in enumerate(type_positions(start, end, n)):
        if pos:
            out[:, t] = ie[:, :, pos].mean(-1)
    return out


def aie(per_fact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[fact, kind, type, layer] -> (mean, 95 % CI half-width) over facts, NaN-aware, each [kind, type, layer]."""
    have = ~per_fact.isnan()
    count = have.sum(0)
    mean = per_fact.nan_to_num().sum(0) / count.clamp(min=1)
    var = ((per_fact - mean).nan_to_num() ** 2).sum(0) / (count - 1).clamp(min=1)
    half = 1.96 * var.sqrt() / count.clamp(min=1).sqrt()
    nan = torch.tensor(math.nan)
    return torch.where(count > 0, mean, nan), torch.where(count > 1, half, nan)
