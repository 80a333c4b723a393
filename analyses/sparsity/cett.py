"""PPL-p% sparsity (Sparsing Law; Luo, Song et al. 2024, arXiv 2411.02335, `thunlp/SparsingLaw`).

Write the MLP output as y = sum_i a_i w_i with a_i the input of the down projection and w_i the
i-th row of W_out. Neuron i's output norm on a token is n_i = |a_i| * ||w_i||. For a per-layer
threshold t the tail is D(t) = {i : n_i <= t} and

    CETT_layer(t) = mean over tokens of ||sum_{i in D(t)} a_i w_i|| / ||sum_i a_i w_i||   (bias left out).

For a CETT value c every layer gets the threshold with CETT_layer(t) = c (bisection); neurons with
n_i <= t are zeroed at inference. The outer bisection finds the c at which the held-text perplexity
ratio exp(loss_sparse - loss_dense) equals 1 + p/100; the activation ratio (fraction of entries not
zeroed, and nonzero) at that point is the PPL-p% activation ratio.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float

from workbench.analyses.sparsity.held import Counter, HeldEval

POST = "blocks.{}.mlp.hook_post"


class TailCurves:
    """Exact per-token CETT curves of each layer: CETT as a function of the number of tail neurons.

    For each calibration token the neurons are sorted by n_i and the partial sums of a_i w_i are
    accumulated, so CETT_layer(t) for any t is a searchsorted and a gather (no matmul per probe).
    """

    def __init__(self, chunk: int = 16):
        self.chunk = chunk
        self.n_sorted: dict[int, torch.Tensor] = {}  # layer -> [tokens, d_mlp] ascending n_i
        self.tail: dict[int, torch.Tensor] = {}  # layer -> [tokens, d_mlp + 1] CETT with k tail neurons

    def add_layer(
        self,
        layer: int,
        acts: Float[torch.Tensor, "tokens d_mlp"],
        W_out: Float[torch.Tensor, "d_mlp d_model"],
    ) -> None:
        w_norm = W_out.norm(dim=-1)  # [d_mlp]
        sorted_n, tails = [], []
        for start in range(0, len(acts), self.chunk):
            a = acts[start : start + self.chunk]  # [c, d_mlp]
            n_sorted, order = (a.abs() * w_norm).sort(dim=-1)
            partial = W_out[order] * a.gather(-1, order)[..., None]  # [c, d_mlp, d_model]
            norms = partial.cumsum_(dim=1).norm(dim=-1)  # [c, d_mlp]; last column = ||y||
            full = norms[:, -1:].clamp_min(1e-30)
            ratio = torch.where(norms[:, -1:] > 0, norms / full, torch.zeros_like(norms))
            tails.append(torch.cat([torch.zeros(len(a), 1), ratio], dim=1))
            sorted_n.append(n_sorted)
        self.n_sorted[layer] = torch.cat(sorted_n)
        self.tail[layer] = torch.cat(tails)

    def cett(self, layer: int, t: float) -> float:
        """CETT_layer(t): mean over calibration tokens of the tail-norm ratio at threshold t."""
        n_sorted = self.n_sorted[layer]
        k = torch.searchsorted(n_sorted, torch.full((len(n_sorted), 1), t), right=True)  # [tokens, 1]
        return self.tail[layer].gather(1, k).mean().item()

    def threshold(self, layer: int, c: float, iters: int = 48) -> float:
        """Largest t (to bisection precision) with CETT_layer(t) <= c; -1 (nothing zeroed) for c <= 0."""
        if c <= 0:
            return -1.0
        lo, hi = -1.0, self.n_sorted[layer][:, -1].max().item()
        if self.cett(layer, hi) <= c:
            return hi
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.cett(layer, mid) <= c else (lo, mid)
        return lo


def cett_hooks(
    thresholds: dict[int, float], w_norms: dict[int, torch.Tensor], counter: Counter, first_pos: int
) -> list:
    """Hooks on `mlp.hook_post` zeroing entries with |a_i| * ||w_i|| <= t_layer (from `first_pos` on)."""

    def make(layer: int):
        t, w_norm = thresholds[layer], w_norms[layer]

        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            n = act[:, first_pos:].abs() * w_norm  # [batch, pos, d_mlp]
            counter.add(layer, n > max(t, 0.0))  # active = kept and nonzero
            out = act.clone()
            out[:, first_pos:] = torch.where(n > t, act[:, first_pos:], torch.zeros_like(n))
            return out

        return hook

    return [(POST.format(layer), make(layer)) for layer in thresholds]


def pplp_search(
    curves: TailCurves,
    held: HeldEval,
    w_norms: dict[int, torch.Tensor],
    p: float,
    tol: float,
    max_iters: int,
    first_pos: int,
    progress,
) -> dict:
    """Bisection on c in [0, 1] until the perplexity ratio is within `tol` of 1 + p/100.

    Returns the evaluated points (trace) and the one closest to the target, with its per-layer
    thresholds and activation ratios.
    """
    target, lo, hi, trace = 1 + p / 100, 0.0, 1.0, []
    for _ in progress(range(max_iters), desc=f"sparsity: PPL-{p:g}% search"):
        c = (lo + hi) / 2
        point = evaluate_cett(curves, held, w_norms, c, first_pos)
        trace.append(point)
        if abs(point["ppl_ratio"] - target) <= tol or hi - lo < 1e-6:
            break
        lo, hi = (c, hi) if point["ppl_ratio"] < target else (lo, c)
    best = min(trace, key=lambda pt: abs(pt["ppl_ratio"] - target))
    return {
        "p": p,
        "target_ratio": target,
        "tol": tol,
        "converged": abs(best["ppl_ratio"] - target) <= tol,
        "dense_loss": held.dense.loss,
        **best,
        "trace": [{k: v for k, v in pt.items() if k not in ("layer_ratio", "thresholds")} for pt in trace],
    }


def evaluate_cett(curves: TailCurves, held: HeldEval, w_norms: dict, c: float, first_pos: int) -> dict:
    """Sparse run at CETT value c: loss, PPL ratio, top-1 agreement and activation ratios."""
    thresholds = {layer: curves.threshold(layer, c) for layer in curves.n_sorted}
    counter = Counter(list(thresholds))
    result = held.evaluate(cett_hooks(thresholds, w_norms, counter, first_pos))
    layer_ratio = counter.ratios()
    return {
        "cett": c,
        "loss": result.loss,
        "ppl_ratio": math.exp(result.loss - held.dense.loss),
        "top1_agree": result.top1_agree,
        "ratio": counter.overall(),
        "layer_ratio": [layer_ratio[layer] for layer in sorted(layer_ratio)],
        "thresholds": [thresholds[layer] for layer in sorted(thresholds)],
    }
