"""Result of the steering comparison: α, KL, concept-token rise per (concept, direction, sign, target); AUROC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.analysis import Result

KINDS = ("snmf", "sae", "diffmeans")
RISE_NOTE = (
    "rise = mean over the 10 open prompts of Σ p(concept tokens) at the next token after the prompt, "
    "steered minus plain (concept tokens: first token of ' word' and ' Word' for the concept's 15 words); "
    "α calibrated so mean KL(plain ‖ steered) over every prompt position is within 10 % of the target"
)
AUROC_NOTE = (
    "AUROC: held-out concept sentences (odd-indexed, 10) vs held-out neutral sentences (12), scored by the "
    "direction's own reading averaged over a sentence's tokens (SNMF coefficient G, SAE latent, projection on "
    "the diff-means direction); the unit was chosen on the even-indexed sentences"
)


@dataclass
class SteeringResult(Result):
    concepts: list[str]
    kinds: list[str]
    targets: list[float]
    signs: list[int]
    units: list[list[int]]
    """[concept][kind] the chosen SNMF feature / SAE latent (-1 for diff-means)."""
    site: str
    sae_site: str
    snmf: str
    dictionary: str
    generations: list[dict]
    plain_generation: str
    prompts: list[str]
    plain_prob: torch.Tensor  # [concept] Σ p(concept tokens) without steering
    auroc: torch.Tensor  # [concept, kind]
    alpha: torch.Tensor  # [concept, kind, sign, target]
    kl: torch.Tensor
    reached: torch.Tensor  # 1.0 when KL is within 10 % of the target
    rise: torch.Tensor

    def summary(self) -> list[dict[str, Any]]:
        """One row per (concept, direction): unit, AUROC, and the rise at each (sign, target KL)."""
        rows = []
        for c, concept in enumerate(self.concepts):
            for i, kind in enumerate(self.kinds):
                row: dict[str, Any] = {
                    "concept": concept,
                    "direction": kind,
                    "unit": self.units[c][i],
                    "AUROC": round(float(self.auroc[c, i]), 3),
                }
                for s, sign in enumerate(self.signs):
                    for t, target in enumerate(self.targets):
                        mark = "" if self.reached[c, i, s, t] > 0 else "*"
                        row[f"{'+' if sign > 0 else '−'}{target:g}"] = (
                            f"{float(self.rise[c, i, s, t]):+.4f}{mark}"
                        )
                rows.append(row)
        return rows

    def mean_rise(self) -> torch.Tensor:
        """[kind, sign, target] rise averaged over concepts (unreached targets included, marked in the table)."""
        return self.rise.nanmean(0)

    def figures(self) -> dict[str, Any]:
        return {
            "Concept-token rise at matched KL": self.rise_figure(),
            "Concept detection AUROC": self.auroc_figure(),
        }

    def rise_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        mean = self.mean_rise()
        for i, kind in enumerate(self.kinds):
            for s, sign in enumerate(self.signs):
                fig.add_trace(
                    go.Scatter(
                        x=self.targets,
                        y=mean[i, s].tolist(),
                        mode="lines+markers",
                        name=f"{kind} {'+' if sign > 0 else '−'}α",
                        line={"dash": "solid" if sign > 0 else "dot"},
                    )
                )
        fig.update_layout(
            xaxis_title="target KL(plain ‖ steered)", yaxis_title="Δ p(concept tokens), mean over concepts"
        )
        return fig

    def auroc_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(
            [
                go.Bar(x=self.concepts, y=self.auroc[:, i].tolist(), name=kind)
                for i, kind in enumerate(self.kinds)
            ]
        )
        fig.update_layout(barmode="group", yaxis_title="held-out AUROC", yaxis_range=[0, 1])
        return fig
