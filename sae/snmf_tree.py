"""Hierarchical SNMF: concept trees of reused neuron combinations (Shafran, Geiger, Geva 2025, §
hierarchical decomposition; the reference is `factorization/hierchichal_snmf.py`).

With ranks r₁ > r₂ > … > r_L, level 1 is an SNMF of A [n_tokens, d_mlp]: A ≈ W₁ F₁ᵀ (W₁ = G ≥ 0
[n, r₁], F₁ [d_mlp, r₁]). Level l+1 is an SNMF of the previous level's directions, one row per
feature: F_lᵀ [r_l, d_mlp] ≈ W_{l+1} F_{l+1}ᵀ with W_{l+1} ≥ 0 [r_l, r_{l+1}]. Together
A ≈ W₁ W₂ … W_L F_Lᵀ, fine-tuned end to end (Adam, lr 1e-3, 500 steps, MSE, as the reference).

Level-l features: directions D_l = F_L W_Lᵀ … W_{l+1}ᵀ [d_mlp, r_l] and token coefficients
C_l = W₁ … W_l [n, r_l]. Fine feature k of level l is the nonnegative combination
D_l[:, k] = Σ_j W_{l+1}[k, j] D_{l+1}[:, j] of the coarser level's directions: coarse feature j is a
neuron combination that the fine features k with large W_{l+1}[k, j] reuse — the concept tree's edges.

Deviations from the reference fine-tuning, with reasons: W_l are projected onto ≥ 0 after every Adam
step (the reference leaves them unconstrained, which would break "nonnegative combination"); F_L keeps
its winner-take-all support (the reference lets Adam fill it in, losing the per-feature sparsity);
the parameters with the lowest loss seen are returned (Adam at lr 1e-3 can overshoot small entries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from workbench.sae.snmf import SNMF, SNMFError, as_matrix, check_finite

FT_LR, FT_STEPS = 1e-3, 500  # the reference's fine-tuning: Adam, lr 1e-3, 500 iterations, MSE


@dataclass
class SNMFTree:
    """A ≈ coefs[0] @ coefs[1] @ … @ coefs[-1] @ components.T; see the module docstring.
    `coefs[0]` [n, r₁] holds the tokens' level-1 coefficients, `coefs[l]` [r_l, r_{l+1}] the
    level-(l+1) links; `components` = F_L [d_mlp, r_L]."""

    ranks: list[int]
    coefs: list[Tensor]
    components: Tensor
    pretrain_loss: float  # ‖A − Â‖² of the greedy level-by-level fit (before fine-tuning)
    loss: float  # ‖A − Â‖² of the returned factors
    finetune_curve: list[float] = field(
        default_factory=list
    )  # MSE before each Adam step, then after the last

    def directions(self, level: int) -> Tensor:
        """D_level [d_mlp, r_level] (level 1 = the finest)."""
        D = self.components
        for W in reversed(self.coefs[level:]):
            D = D @ W.T
        return D

    def token_coefs(self, level: int) -> Tensor:
        """C_level = W₁ … W_level [n_tokens, r_level]."""
        C = self.coefs[0]
        for W in self.coefs[1:level]:
            C = C @ W
        return C

    def tree(self, min_share: float = 0.2) -> list[dict]:
        """The concept tree as plain data: for each level l ≥ 2 and coarse feature j, the finer
        level-(l-1) features k that reuse it, with `weight` W_l[k, j] and `share`, the fraction of
        k's combination W_l[k, :] · ‖D_l[:, :]‖ that j carries; children with share ≥ min_share,
        largest share first."""
        out = []
        for level in range(2, len(self.ranks) + 1):
            W = self.coefs[level - 1]
            contrib = W * self.directions(level).norm(dim=0)  # [r_{l-1}, r_l]
            share = contrib / contrib.sum(1, keepdim=True).clamp(min=1e-30)
            for j in range(W.shape[1]):
                kids = (share[:, j] >= min_share).nonzero().flatten().tolist()
                kids.sort(key=lambda k: -float(share[k, j]))
                children = [
                    {"feature": k, "weight": float(W[k, j]), "share": float(share[k, j])} for k in kids
                ]
                out.append({"level": level, "feature": j, "children": children})
        return out


def check_ranks(ranks) -> list[int]:
    ranks = list(ranks)
    if len(ranks) < 2 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise SNMFError(f"hierarchical SNMF needs two or more positive integer ranks, got {ranks!r}")
    if any(a <= b for a, b in zip(ranks, ranks[1:])):
        raise SNMFError(f"hierarchical SNMF ranks must decrease (r1 > r2 > …), got {ranks!r}")
    return ranks


def fit_hierarchical(A, ranks, finetune_steps: int = FT_STEPS, lr: float = FT_LR, **snmf_params) -> SNMFTree:
    """Greedy level-by-level SNMF fits (each with `snmf_params`, e.g. sparsity, init, max_iter, seed),
    then end-to-end fine-tuning; see the module docstring."""
    ranks = check_ranks(ranks)
    SNMF(ranks[0], **snmf_params)._check()
    A = as_matrix(A)
    check_finite(A)
    if ranks[0] > min(A.shape):
        raise SNMFError(
            f"rank {ranks[0]} is larger than the data: {A.shape[0]} tokens × {A.shape[1]} neurons"
        )
    coefs, data, F = [], A, None
    for r in ranks:
        est = SNMF(r, **snmf_params).fit(data)
        coefs.append(est.coef_)
        F, data = est.components_, est.components_.T
    pre = recon_loss(A, coefs, F)
    coefs, F, curve, loss = finetune(A, coefs, F, finetune_steps, lr)
    return SNMFTree(ranks, coefs, F, pre, loss, curve)


def product(coefs: list[Tensor], F: Tensor) -> Tensor:
    """W₁ (W₂ (… W_L F_Lᵀ)): the small factors first, one [n, d_mlp] product last."""
    M = F.T
    for W in reversed(coefs[1:]):
        M = W @ M
    return coefs[0] @ M


def recon_loss(A: Tensor, coefs: list[Tensor], F: Tensor) -> float:
    return float((A - product(coefs, F)).double().pow(2).sum())


def finetune(A: Tensor, coefs: list[Tensor], F: Tensor, steps: int, lr: float):
    """Adam on MSE(A, W₁…W_L F_Lᵀ) with W ≥ 0 and F_L's support kept; the best parameters seen
    (the start included). Returns (coefs, F, MSE curve [steps + 1, the start first], ‖A − Â‖² of
    the returned factors)."""
    params = [W.clone().requires_grad_() for W in coefs] + [F.clone().requires_grad_()]
    support = F != 0
    best, best_mse, curve = None, float("inf"), []
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps + 1):  # the loss of step t's parameters is read at step t+1's forward
        opt.zero_grad()
        mse = (product(params[:-1], params[-1]) - A).pow(2).mean()
        curve.append(float(mse.detach()))
        if curve[-1] < best_mse:
            best_mse, best = curve[-1], [p.detach().clone() for p in params]
        if len(curve) > steps:
            break
        mse.backward()
        opt.step()
        with torch.no_grad():
            for W in params[:-1]:
                W.clamp_(min=0)
            params[-1].mul_(support)
    return best[:-1], best[-1], curve, recon_loss(A, best[:-1], best[-1])
