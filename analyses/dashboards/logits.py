"""Logit effects of output directions, through the final norm as peers compute them.

SAEDashboard and Neuronpedia compute a feature's top ± logits on a norm-folded model
(TransformerLens `fold_ln`, `center_unembed`): W_U there is diag(γ_final)·W_U with its mean over
the vocabulary removed, and for LayerNorm models the residual writers are centred over d_model.
Here the same numbers come from any model, raw or compat: fold γ_final into W_U, centre the
direction over d_model when the final norm is a LayerNorm (it removes the mean), and subtract each
row's mean logit (softmax ignores it). On a compat model γ is already 1 and both centrings are
already done, so this is the identity there; raw and compat give the same table (tested).
"""

from __future__ import annotations

import torch

NOTE = (
    "logit effect = D · diag(γ_final) · W_U, minus its mean over the vocabulary (D centred over "
    "d_model for LayerNorm models): the direct effect through the final norm's gain, as "
    "SAEDashboard/Neuronpedia compute on norm-folded models; the same in raw and compat mode"
)


def folded_unembed(model) -> tuple[torch.Tensor, bool]:
    """(diag(γ_final) · W_U [d_model, vocab], whether the final norm centres its input)."""
    W_U = model.W_U.detach().float()
    gamma = getattr(getattr(model, "ln_final", None), "weight", None)
    if gamma is not None:
        W_U = W_U * gamma.detach().float().to(W_U.device)[:, None]
    centre = str(getattr(model.cfg, "normalization_type", "") or "").startswith("LN")
    return W_U, centre


def logit_effects(D: torch.Tensor, W_U: torch.Tensor, centre: bool) -> torch.Tensor:
    """[n, vocab] logit effects of directions D [n, d_model] through a folded W_U (folded_unembed)."""
    D = D.float().to(W_U.device)
    if centre:
        D = D - D.mean(-1, keepdim=True)
    logits = D @ W_U
    return logits - logits.mean(-1, keepdim=True)
