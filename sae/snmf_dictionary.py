"""SNMF features as a SAELens dictionary: one code path with SAE latents.

A fitted `sae.snmf.SNMF` (A ≈ G Fᵀ, F [d_mlp, rank], G ≥ 0; Shafran, Geiger, Geva 2025,
arXiv 2506.10920) is saved as a SAELens folder (`cfg.json` + `sae_weights.safetensors`) of
architecture "snmf", so `SAE.load_from_disk`, the Feature explorer, the dashboards and the prompt
lens read it like any SAE:

* `W_dec` = Fᵀ [rank, d_mlp]: feature k's neuron combination is row k; `decode(G)` = G Fᵀ (b_dec = 0);
* `encode(x)` = the nonnegative coefficients argmin_{G ≥ 0} ‖x − G Fᵀ‖², by the same solver as
  `SNMF.transform` (`sae.snmf.solve_coef`; rows are solved in one chunk per call, so a call on the
  training rows reproduces `SNMF.transform` on them);
* `W_enc` = F is stored only because SAELens' base class holds one; encoding never reads it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens.saes.sae import SAE, SAEConfig, SAEMetadata
from torch import Tensor
from typing_extensions import override

ARCH = "snmf"


@dataclass
class SNMFSAEConfig(SAEConfig):
    """Inference config of SNMF features (d_in = d_mlp, d_sae = rank)."""

    @classmethod
    def architecture(cls) -> str:
        return ARCH


class SNMFSAE(SAE[SNMFSAEConfig]):
    """SNMF features behind SAELens' interface: encode = nonnegative coefficients, decode = G Fᵀ."""

    @override
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        from workbench.sae.snmf import COEF_MAX_ITER, COEF_RTOL, solve_coef

        sae_in = self.process_sae_in(x)
        flat = sae_in.reshape(-1, sae_in.shape[-1])
        G, _ = solve_coef(
            flat.detach(),
            self.W_dec.detach().T.contiguous().to(flat.dtype),
            COEF_MAX_ITER,
            COEF_RTOL,
            chunk=max(len(flat), 1),
        )
        return self.hook_sae_acts_post(G.reshape(*sae_in.shape[:-1], -1))

    @override
    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)


def to_dictionary(components: Tensor, metadata: dict) -> SNMFSAE:
    """An SNMFSAE holding F = `components` [d_mlp, rank]; `metadata` as SAELens' (hook_name …)."""
    F = components.detach().float().cpu()
    cfg = SNMFSAEConfig(
        d_in=F.shape[0], d_sae=F.shape[1], apply_b_dec_to_input=False, metadata=SAEMetadata(**metadata)
    )
    with warnings.catch_warnings():  # SAELens' advice on model_from_pretrained_kwargs: sae.compat checks that
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
        sae = SNMFSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(F.T)
        sae.W_enc.copy_(F)
        sae.b_dec.zero_()
    return sae
