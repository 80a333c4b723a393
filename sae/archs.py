"""Dictionary architectures by name: SAELens training classes where they exist, ours otherwise.

| name        | paper                                   | class (training)               | saved as (inference)   |
|-------------|-----------------------------------------|--------------------------------|------------------------|
| standard    | Anthropic April 2024 (ReLU + λΣf‖W_dec‖)| sae_lens StandardTrainingSAE   | standard               |
| topk        | Gao et al. 2024 (+ AuxK, α = 1/32)      | sae_lens TopKTrainingSAE       | topk                   |
| batchtopk   | Bussmann et al. 2024 (global θ)         | sae_lens BatchTopKTrainingSAE  | jumprelu (θ = EMA)     |
| jumprelu    | Rajamanoharan et al. 2024 (λ·L0, STE)   | sae_lens JumpReLUTrainingSAE   | jumprelu               |
| mp          | Costa et al. 2025 (matching pursuit)    | sae_lens MatchingPursuit…      | matching_pursuit       |
| transcoder  | Dunefsky et al. 2024 (ln2 -> mlp_out)   | sae.transcoder (ours)          | transcoder             |
| top_afa     | Lee et al. 2025 (per-token k*, AFA loss)| sae.topafa (ours)              | top_afa (ours)         |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import (
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    MatchingPursuitTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.saes.sae import SAEMetadata, TrainingSAEConfig

from workbench.sae.topafa import TopAFATrainingSAEConfig
from workbench.sae.transcoder import TranscoderTrainingSAEConfig, check_input_site

ARCHS = ("standard", "topk", "batchtopk", "jumprelu", "mp", "transcoder", "top_afa")


class ArchError(ValueError):
    """An unknown architecture or a setting it cannot take."""


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a fresh training dictionary."""

    arch: str
    d_in: int
    d_sae: int
    d_out: int = 0
    k: int = 32
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1e-3
    aux_coefficient: float = 1 / 32
    afa_coefficient: float = 1 / 32
    sparsity_warm_up_steps: int = 0
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity: str = "step"  # step: paper λ·L0; quadratic: λ·2/L0*·(L0 − L0*)² (Gemma Scope 2)
    target_l0: float = 0.0
    jumprelu_init_threshold: float = 0.01


def training_config(spec: ArchSpec, metadata: dict | None = None) -> TrainingSAEConfig:
    """SAELens training config for `spec`; raises ArchError for unknown names."""
    common = {"d_in": spec.d_in, "d_sae": spec.d_sae, "metadata": SAEMetadata(**(metadata or {}))}
    topk = {"k": spec.k, "aux_loss_coefficient": spec.aux_coefficient}
    l1 = {"l1_coefficient": spec.l1_coefficient, "l1_warm_up_steps": spec.sparsity_warm_up_steps}
    if spec.arch == "standard":
        return StandardTrainingSAEConfig(**common, **l1)
    if spec.arch == "topk":
        return TopKTrainingSAEConfig(**common, **topk)
    if spec.arch == "batchtopk":
        return BatchTopKTrainingSAEConfig(**common, **topk)
    if spec.arch == "jumprelu":
        if spec.jumprelu_sparsity not in ("step", "tanh", "quadratic"):
            raise ArchError(
                f"jumprelu_sparsity must be step, tanh or quadratic, not '{spec.jumprelu_sparsity}'"
            )
        if spec.jumprelu_sparsity == "quadratic" and spec.target_l0 <= 0:
            raise ArchError("the quadratic JumpReLU sparsity loss needs target_l0 > 0")
        return JumpReLUTrainingSAEConfig(
            **common,
            l0_coefficient=spec.l0_coefficient,
            l0_warm_up_steps=spec.sparsity_warm_up_steps,
            jumprelu_bandwidth=spec.jumprelu_bandwidth,
            jumprelu_init_threshold=spec.jumprelu_init_threshold,
            jumprelu_sparsity_loss_mode=spec.jumprelu_sparsity,
            target_l0=spec.target_l0 or None,
        )
    if spec.arch == "mp":
        # exactly k greedy steps (Costa et al. 2025 / overcomplete): SAELens' defaults stop early on
        # a small residual or when a step re-selects an atom already in the support (then the
        # steps after it, which would add new atoms, never run)
        return MatchingPursuitTrainingSAEConfig(
            **common,
            decoder_init_norm=1.0,
            max_iterations=spec.k,
            residual_threshold=0.0,
            stop_on_duplicate_support=False,
        )
    if spec.arch == "transcoder":
        if spec.d_out <= 0:
            raise ArchError("a transcoder needs a target site (its width d_out)")
        check_input_site(common["metadata"].hook_name or "", _processing(metadata or {}))
        return TranscoderTrainingSAEConfig(**common, d_out=spec.d_out, **l1)
    if spec.arch == "top_afa":
        return TopAFATrainingSAEConfig(
            **common,
            k=spec.k,
            aux_loss_coefficient=spec.aux_coefficient,
            afa_coefficient=spec.afa_coefficient,
        )
    raise ArchError(f"unknown architecture '{spec.arch}'; choose one of {', '.join(ARCHS)}")


def _processing(metadata: dict) -> str:
    """The weight-processing mode a dictionary's metadata records ('' when it records none)."""
    from workbench.sae.compat import processing_in  # one reader of the recorded processing

    return processing_in(metadata) or ""


def build(spec: ArchSpec, metadata: dict | None = None, seed: int = 0) -> TrainingSAE:
    """A freshly initialised training dictionary (seeded)."""
    cfg = training_config(spec, metadata)
    torch.manual_seed(seed)
    cls = TrainingSAE.get_sae_class_for_architecture(cfg.architecture())
    sae = cls(cfg)
    if spec.arch == "mp":
        post_step_unit_norm(sae)  # MP needs unit-norm atoms: ‖r‖ decreases only then
    return sae


@torch.no_grad()
def post_step_unit_norm(sae: TrainingSAE) -> None:
    sae.W_dec.data /= sae.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)


@torch.no_grad()
def post_step(sae: TrainingSAE) -> None:
    """Constraints applied after each optimiser step (normalise after the step, dictionary_learning #36)."""
    if hasattr(sae, "post_step"):
        sae.post_step()
    elif sae.cfg.architecture() == "matching_pursuit":
        post_step_unit_norm(sae)
