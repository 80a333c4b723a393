"""Hierarchical SNMF for the analysis: the level-1 features and the concept tree above them.

`sae.snmf_tree.fit_hierarchical` fits ranks r₁ > r₂ > … level by level and fine-tunes the product
end to end (Shafran, Geiger, Geva 2025). The analysis reads level 1 as its features (directions
D₁ [d_mlp, r₁], token coefficients C₁ [n, r₁]) and keeps the tree: for each coarser feature, the
finer features that reuse its neuron combination (`SNMFTree.tree`), each coarse feature labelled by
the top tokens of its own vocabulary projection (the same norm-folded W_U · W_outᵀ D path).
"""

from __future__ import annotations

import torch

from workbench.analyses.dashboards.logits import folded_unembed, logit_effects


def parse_ranks(rank: int, text: str) -> list[int]:
    """[rank, *coarser]; a ValueError in one line unless they are integers decreasing below rank."""
    try:
        coarse = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"tree_ranks must be comma-separated integers, got '{text}'") from None
    ranks = [rank, *coarse]
    if any(r < 1 for r in coarse) or any(a <= b for a, b in zip(ranks, ranks[1:], strict=False)):
        raise ValueError(f"tree_ranks must decrease below rank {rank} (e.g. '20,5'), got '{text}'")
    return ranks


def fit_tree(A: torch.Tensor, ranks: list[int], snmf_params: dict):
    """(F = D₁ [d_mlp, r₁], G = C₁ [n, r₁] ≥ 0, the SNMFTree)."""
    from workbench.sae.snmf_tree import fit_hierarchical

    tree = fit_hierarchical(A, ranks, **snmf_params)
    return tree.directions(1).float(), tree.token_coefs(1).clamp(min=0).float(), tree


@torch.no_grad()
def labels(tree, model, layer: int | None, n: int = 5) -> dict[str, list[int]]:
    """'level:feature' -> the token ids it promotes most (levels ≥ 2), through W_out[layer] and W_U."""
    if layer is None:
        return {}
    W_U, centre = folded_unembed(model)
    W_out = model.W_out[layer].detach().float()
    out = {}
    for level in range(2, len(tree.ranks) + 1):
        D = tree.directions(level).float().T @ W_out  # [r_level, d_model]
        top = logit_effects(D, W_U, centre).topk(n).indices
        for j, ids in enumerate(top.tolist()):
            out[f"{level}:{j}"] = ids
    return out
