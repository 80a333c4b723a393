"""Top-k activation intervention (Lazy Neuron, Li et al. 2023, §"enforcing sparsity": Top-k Transformer).

At the chosen layers keep, for every token separately, the k MLP activations a_i with the largest
|a_i| (or, with the weight-informed score, the largest |a_i| * ||w_i||, as in WINA / CETT) and zero
the rest; measure loss, perplexity and top-1 agreement with the unmodified model as k varies.
Ranking is per token, never over the flattened [batch x pos x d_mlp] tensor (the Sparsing Law
code's `prune_topk` pitfall). With k = d_mlp the hook returns its input unchanged, so the loss
equals the unmodified loss exactly.
"""

from __future__ import annotations

import torch

from workbench.analyses.sparsity.held import Counter, HeldEval

POST = "blocks.{}.mlp.hook_post"
SCORES = ("abs", "weighted")


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """[..., d_mlp] bool: True at the k largest scores of each row (ties broken by torch.topk)."""
    if k >= score.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def topk_hooks(
    layers: list[int], k: int, w_norms: dict, counter: Counter, first_pos: int, score: str
) -> list:
    """Hooks on `mlp.hook_post` keeping the top-k entries per token (positions from `first_pos` on)."""

    def make(layer: int):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            tail = act[:, first_pos:]  # [batch, pos, d_mlp]
            s = tail.abs() * w_norms[layer] if score == "weighted" else tail.abs()
            keep = topk_mask(s, k)
            counter.add(layer, keep & (tail != 0))
            out = act.clone()
            out[:, first_pos:] = torch.where(keep, tail, torch.zeros_like(tail))
            return out

        return hook

    return [(POST.format(layer), make(layer)) for layer in layers]


def topk_sweep(
    held: HeldEval, layers: list[int], ks: list[int], w_norms: dict, first_pos: int, score: str, progress
) -> list[dict]:
    """One row per k: loss, perplexity, loss increase over the unmodified model, top-1 agreement."""
    rows = []
    for k in progress(ks, desc="sparsity: top-k sweep"):
        counter = Counter(layers)
        result = held.evaluate(topk_hooks(layers, k, w_norms, counter, first_pos, score))
        rows.append(
            {
                "k": k,
                "loss": result.loss,
                "ppl": result.ppl,
                "delta_loss": result.loss - held.dense.loss,
                "top1_agree": result.top1_agree,
                "active_ratio": counter.overall(),
            }
        )
    return rows
