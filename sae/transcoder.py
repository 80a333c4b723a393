"""Training transcoders (Dunefsky, Chlenski, Nanda 2024, "Transcoders Find Interpretable LLM
Feature Circuits") in SAELens' inference `transcoder` format.

A transcoder reads the MLP's input x (`blocks.{l}.mlp.hook_in` = `ln2.hook_out`, after the norm's
weight γ; d_in) and predicts the MLP output y (`blocks.{l}.hook_mlp_out`, d_out) through a sparse
code:
    f = ReLU(W_encᵀ x + b_enc),  ŷ = W_dec f + b_dec          (b_dec has d_out entries)
Loss = ‖ŷ − y‖² + λ Σ_i f_i ‖W_dec,i‖ (SAELens' decoder-norm-weighted L1, not the repo's ÷‖y‖
normalisation and ghost grads; see methods.md §2.5). SAELens ships the inference class only
(`Transcoder`), so this registers the training class under the same architecture name; the
trainer feeds `torch.cat([x, y], -1)` rows, which `training_forward_pass` splits.

`ln2.hook_normalized` is NOT the MLP input in raw mode: it is taken before γ (on smollm2 layer 15,
`gate_proj` of it differs from `mlp.hook_pre` by up to 41; of `mlp.hook_in` it matches exactly).
In compat mode γ is folded into the MLP's weights, so the two coincide there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import (
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.transcoder import TranscoderConfig
from torch import Tensor, nn
from typing_extensions import override

ARCH = "transcoder"
MLP_INPUT = "mlp.hook_in"  # the MLP's true input: gate_proj/up_proj (W_in) read exactly this
_PRE_GAMMA = "ln2.hook_normalized"


def mlp_input_site(layer: int | str) -> str:
    """The hook holding what layer `layer`'s MLP reads (after ln2 and its weight γ)."""
    return f"blocks.{layer}.{MLP_INPUT}"


def is_mlp_input(site: str) -> bool:
    return site.startswith("blocks.") and site.endswith("." + MLP_INPUT)


def mlp_output_site(site: str) -> str:
    """`hook_mlp_out` of the block `site` belongs to; '' for a site outside `blocks.N`."""
    parts = site.split(".")
    return (
        f"blocks.{parts[1]}.hook_mlp_out"
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit()
        else ""
    )


def check_input_site(site: str, processing: str) -> None:
    """Refuse the pre-γ `ln2.hook_normalized` as a transcoder input on raw activations (one line)."""
    if processing == "raw" and site.endswith("." + _PRE_GAMMA):
        raise ValueError(
            f"'{site}' is taken before the norm's weight γ, so it is not what the MLP reads in raw "
            f"mode; train the transcoder on '{site.removesuffix(_PRE_GAMMA) + MLP_INPUT}'"
        )


@dataclass(kw_only=True)
class TranscoderTrainingSAEConfig(TrainingSAEConfig):
    """Training config of a ReLU + L1 transcoder; `d_out` is the target site's width."""

    d_out: int = 768
    apply_b_dec_to_input: bool = False
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0

    @classmethod
    def architecture(cls) -> str:
        return ARCH

    @override
    def get_inference_config_class(self) -> type[TranscoderConfig]:
        return TranscoderConfig


class TranscoderTrainingSAE(TrainingSAE[TranscoderTrainingSAEConfig]):
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out]."""

    b_enc: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_out
        kw = {"dtype": self.dtype, "device": self.device}
        W_dec = torch.empty(d_sae, d_out, **kw)
        nn.init.kaiming_uniform_(W_dec)
        if self.cfg.decoder_init_norm is not None:
            W_dec *= self.cfg.decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
        W_enc = torch.empty(d_in, d_sae, **kw)
        nn.init.kaiming_uniform_(W_enc)
        if self.cfg.decoder_init_norm is not None:
            W_enc *= self.cfg.decoder_init_norm / W_enc.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc)
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))

    @override
    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        sae_in = self.hook_sae_input(sae_in.to(self.dtype))
        return self.run_time_activation_norm_fn_in(sae_in)  # no b_dec: it lives in output space

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(hidden_pre.relu()), hidden_pre

    @override
    def decode(self, feature_acts: Tensor) -> Tensor:
        return self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "l1": TrainCoefficientConfig(
                value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps
            )
        }

    @override
    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        sparsity = (feature_acts * self.W_dec.norm(dim=1)).sum(-1)
        return {"l1_loss": (step_input.coefficients["l1"] * sparsity).mean()}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """`step_input.sae_in` is `[x, y]` concatenated on the last axis."""
        x, y = step_input.sae_in.split([self.cfg.d_in, self.cfg.d_out], dim=-1)
        feature_acts, hidden_pre = self.encode_with_hidden_pre(x)
        y_hat = self.decode(feature_acts)
        mse_loss = self.mse_loss_fn(y_hat, y).sum(dim=-1).mean()
        inner = TrainStepInput(
            y, step_input.coefficients, step_input.dead_neuron_mask, step_input.n_training_steps, False
        )
        losses = {"mse_loss": mse_loss, **self.calculate_aux_loss(inner, feature_acts, hidden_pre, y_hat)}
        return TrainStepOutput(
            sae_in=y,
            sae_out=y_hat,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),
            losses=losses,
        )

    @torch.no_grad()
    def fold_scaling(self, in_factor: float, out_factor: float) -> None:
        """Make a transcoder trained on (s_in·x, s_out·y) act on raw x and predict raw y."""
        self.W_enc.data *= in_factor
        self.W_dec.data /= out_factor
        self.b_dec.data /= out_factor

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        return None
