"""Patching metrics on the final-position logits, one value per prompt (the task metric is their mean).

* `logit_diff`: LD = logit(answer) - logit(wrong).
* `normalized`: M = (LD - LD_corr) / (LD_clean - LD_corr), LD_clean and LD_corr the task means on
  the clean and corrupted prompts, so M is 1 on clean and 0 on corrupted (RelP paper; Wang et al.).
* `prob`: softmax probability of the answer.
* `kl`: KL(p_clean || p) of the next-token distributions, clean run as the reference (0 on clean).

Every metric is a mean over prompts of a per-prompt value, so a batch row never influences another
and per-prompt effects add up to the task's effect exactly.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

METRICS = ("normalized", "logit_diff", "prob", "kl")


class MetricError(ValueError):
    """A metric that is undefined on this task (e.g. normalising by a zero clean-corrupted gap)."""


class PromptMetric:
    """Per-prompt metric of one length group; `rows` maps batch rows to the group's prompts."""

    def __init__(
        self,
        name: str,
        answer: Int[torch.Tensor, " batch"],
        wrong: Int[torch.Tensor, " batch"],
        clean_logprobs: Float[torch.Tensor, "batch vocab"] | None = None,
        ld_clean: float = 1.0,
        ld_corrupted: float = 0.0,
    ):
        if name not in METRICS:
            raise MetricError(f"unknown metric '{name}'; choose from {', '.join(METRICS)}")
        if name == "normalized" and abs(ld_clean - ld_corrupted) < 1e-6:
            raise MetricError(
                f"clean and corrupted logit differences are equal ({ld_clean:.4g}): the normalized "
                "metric is undefined on this task; use metric=logit_diff"
            )
        self.name, self.answer, self.wrong = name, answer, wrong
        self.clean_logprobs, self.ld_clean, self.ld_corrupted = clean_logprobs, ld_clean, ld_corrupted

    def __call__(
        self, last: Float[torch.Tensor, "rows vocab"], rows: Int[torch.Tensor, " rows"]
    ) -> Float[torch.Tensor, " rows"]:
        last = last.float()
        if self.name == "prob":
            return last.softmax(-1).gather(-1, self.answer[rows, None])[:, 0]
        if self.name == "kl":
            ref = self.clean_logprobs[rows]
            return (ref.exp() * (ref - last.log_softmax(-1))).sum(-1)
        ld = logit_diff(last, self.answer[rows], self.wrong[rows])
        if self.name == "logit_diff":
            return ld
        return (ld - self.ld_corrupted) / (self.ld_clean - self.ld_corrupted)


def logit_diff(
    last: Float[torch.Tensor, "rows vocab"],
    answer: Int[torch.Tensor, " rows"],
    wrong: Int[torch.Tensor, " rows"],
) -> Float[torch.Tensor, " rows"]:
    """logit(answer) - logit(wrong) per row."""
    return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None]))[:, 0]
