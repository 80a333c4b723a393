"""When a unit "fires": one rule for non-negative and signed units (dashboards, prompt lens, stats).

Dictionary latents (ReLU, TopK, JumpReLU…) are non-negative: a latent fires when its activation
is > 0, and its density is the fraction of tokens where it does (SAELens, Neuronpedia).
Neurons of gated MLPs (SwiGLU: SmolLM2, Llama) and residual-stream dimensions take both signs and
are almost never exactly 0, so "> 0" holds on about half the tokens and measures nothing; for
about half of SmolLM2's layer-15 neurons the largest-magnitude activation is negative.

The rule, per unit, over the scanned tokens:
- the unit is **signed** when its smallest activation is < 0, else **non-negative**;
- a non-negative unit fires when a > 0 (threshold 0);
- a signed unit fires when |a| > FIRE_FRACTION · max|a| (its own scale, either sign): positive
  firings a > t and negative firings a < −t count separately and together.
The 10 % matches Bills et al. 2023 ("Language models can explain neurons"), who scale each
neuron's activations to 0–10 by its maximum and treat what rounds to 0 as not firing. It is
relative to the maximum over the scanned tokens, so more tokens (a larger maximum) give a somewhat
lower density. Measured on SmolLM2 layer-15 `mlp.hook_post` (2032 WikiText tokens): every neuron
is signed, 49.8 % of entries are > 0, 49.9 % of neurons have their largest |a| negative; under
this rule the median density is 0.29 (p10 0.10, p90 0.62), half of it below zero.
GELU neurons are signed by this rule (GELU dips to −0.17), but their negative side never reaches
10 % of a typical positive maximum, so they fire on the positive side only, as expected.

On one prompt (no dataset scale) units are ranked by |a|, sign kept: `top_units`.
"""

from __future__ import annotations

import torch

FIRE_FRACTION = 0.1
"""A signed unit fires when |a| exceeds this fraction of its largest |a| over the scanned tokens."""

RULE = (
    "non-negative units (min ≥ 0, e.g. dictionary latents) fire when a > 0; signed units "
    f"(min < 0, e.g. SwiGLU neurons) fire when |a| > {FIRE_FRACTION:g} × max|a| over the scanned "
    "tokens, on either side; density = fraction of scanned tokens where the unit fires"
)
"""The rule in one line, as stated in results and on the app's pages."""


def is_signed(min_act: torch.Tensor) -> torch.Tensor:
    """[n] bool: the unit took a negative value on the scanned tokens."""
    return min_act < 0


def fire_threshold(min_act: torch.Tensor, max_act: torch.Tensor) -> torch.Tensor:
    """[n] threshold t on |a|: 0 for non-negative units, FIRE_FRACTION · max|a| for signed units."""
    scale = torch.maximum(min_act.abs(), max_act.abs())
    return torch.where(is_signed(min_act), FIRE_FRACTION * scale, torch.zeros_like(scale))


def fires(acts: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """[..., n] bool: |a| > t (for a non-negative unit, t = 0, this is a > 0)."""
    return acts.abs() > threshold


def top_units(acts: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k units of one token's activations [n] with the largest |a|, as (index, signed a):
    a strongly negative SwiGLU neuron ranks with the strongly positive ones."""
    acts = acts.flatten().float()
    _, idx = acts.abs().topk(min(k, acts.numel()))
    return [(int(i), float(acts[i])) for i in idx]
