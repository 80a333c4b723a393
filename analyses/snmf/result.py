"""The SNMF result: per feature contexts, neurons, vocabulary projection and density; figures and table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.analysis import Result


@dataclass
class SNMFResult(Result):
    site: str
    model: str
    layer: int | None
    rank: int
    sparsity: float
    n_tokens: int
    """Rows fitted (BOS excluded)."""
    d_mlp: int
    dictionary: str
    """SAELens folder of the fit (architecture "snmf"): load with sae.io.load_dictionary."""
    warning: str
    """Non-empty when the site is not an MLP activation."""
    rows_note: str
    density_rule: str
    logit_note: str
    loss: float
    """‖A − G Fᵀ‖²_F of the returned factors."""
    fvu: float
    """loss / ‖A − mean(A)‖²_F: fraction of the centred variance left unexplained."""
    n_iter: int
    decoded: dict[str, str]
    window_before: int
    tree_ranks: list[int]
    """[r1, r2, …] of a hierarchical fit (features = level 1); [] for a flat fit."""
    tree: list[dict]
    """Concept tree edges (sae.snmf_tree.SNMFTree.tree): per coarse feature, the finer ones reusing it."""
    tree_labels: dict[str, list[int]]
    """'level:feature' -> top promoted token ids of each coarse feature."""
    loss_curve: torch.Tensor  # [n_iter] float64
    neuron_ids: torch.Tensor  # [rank, n_neurons]
    neuron_weights: torch.Tensor  # [rank, n_neurons] signed F entries
    top_coefs: torch.Tensor  # [rank, n_top]
    top_rows: torch.Tensor  # [rank, n_top] store rows (-1 = none)
    ctx_tokens: torch.Tensor  # [rank, n_top, window] (-1 = outside the sequence)
    ctx_coefs: torch.Tensor  # [rank, n_top, window] G of the feature on each context token
    density: torch.Tensor  # [rank]
    max_coef: torch.Tensor  # [rank]
    mean_coef: torch.Tensor  # [rank]
    top_logit_ids: torch.Tensor  # [rank, 10]
    top_logit_vals: torch.Tensor
    bottom_logit_ids: torch.Tensor
    bottom_logit_vals: torch.Tensor
    neighbors: torch.Tensor  # [rank, 8] nearest features by cosine of F columns
    neighbor_cos: torch.Tensor

    def token(self, t: int) -> str:
        return self.decoded.get(str(int(t)), f"<{int(t)}>")

    def logit_tokens(self, k: int, top: bool = True, n: int = 10) -> list[str]:
        ids = (self.top_logit_ids if top else self.bottom_logit_ids)[k][:n]
        return [self.token(t) for t in ids if t >= 0]

    def context(self, k: int, j: int) -> tuple[list[str], list[float]]:
        """Tokens and coefficients of feature k's j-th top context (tokens outside the sequence dropped)."""
        toks, vals = self.ctx_tokens[k, j], self.ctx_coefs[k, j]
        keep = toks >= 0
        return [self.token(t) for t in toks[keep]], [float(v) for v in vals[keep]]

    def top_token(self, k: int, j: int) -> str:
        """The activating token of context j (at window_before in the window)."""
        t = int(self.ctx_tokens[k, j, self.window_before])
        return self.token(t) if t >= 0 else ""

    def tree_rows(self) -> list[dict[str, Any]]:
        """One row per coarse feature: its level, its top tokens and the finer features reusing it (share)."""
        rows = []
        for node in self.tree:
            ids = self.tree_labels.get(f"{node['level']}:{node['feature']}", [])
            rows.append(
                {
                    "level": node["level"],
                    "feature": node["feature"],
                    "promotes": " ".join(self.token(t) for t in ids),
                    "reused by": ", ".join(
                        f"L{node['level'] - 1} f{c['feature']} ({c['share']:.2f})" for c in node["children"]
                    ),
                }
            )
        return rows

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for k in range(self.rank):
            n_ctx = int((self.top_rows[k] >= 0).sum())
            rows.append(
                {
                    "feature": k,
                    "density": round(float(self.density[k]), 4),
                    "max G": round(float(self.max_coef[k]), 3),
                    "top tokens": " | ".join(self.top_token(k, j) for j in range(min(n_ctx, 5))),
                    "promotes": " ".join(self.logit_tokens(k, True, 5)),
                    "suppresses": " ".join(self.logit_tokens(k, False, 5)),
                    "top neurons": ", ".join(
                        f"{int(i)}:{float(w):+.2f}"
                        for i, w in zip(self.neuron_ids[k][:4], self.neuron_weights[k][:4], strict=True)
                    ),
                }
            )
        return rows

    def figures(self) -> dict[str, Any]:
        return {
            "Loss per iteration": self.loss_figure(),
            "Feature density": self.density_figure(),
            "Top neurons per feature (|F|)": self.neuron_figure(),
        }

    def loss_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(y=self.loss_curve.tolist(), mode="lines", name="loss"))
        fig.update_layout(xaxis_title="iteration", yaxis_title="‖A − G Fᵀ‖²", yaxis_type="log")
        return fig

    def density_figure(self):
        import plotly.graph_objects as go

        order = self.density.argsort(descending=True)
        fig = go.Figure(
            go.Bar(x=[f"f{int(k)}" for k in order], y=self.density[order].tolist(), name="density")
        )
        fig.update_layout(xaxis_title="feature (by density)", yaxis_title="fraction of tokens firing")
        return fig

    def neuron_figure(self):
        import plotly.graph_objects as go

        w = self.neuron_weights.abs()
        fig = go.Figure(
            go.Heatmap(
                z=w.tolist(),
                text=[[str(int(i)) for i in row] for row in self.neuron_ids],
                hovertemplate="feature %{y}, rank %{x}: neuron %{text}, |F| %{z:.3f}<extra></extra>",
                colorscale="Blues",
            )
        )
        fig.update_layout(xaxis_title="neuron rank within the feature", yaxis_title="feature")
        return fig
