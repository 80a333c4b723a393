"""The sparsity result: per-neuron firing rates, PPL-p% point and search trace, top-k curve; figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.analysis import Result

LABELS = {
    "nonzero": "a != 0 (ε = 0)",
    "eps": "|a| > ε",
    "pre_pos": "pre-activation > 0",
}


@dataclass
class SparsityResult(Result):
    model: str
    store: str
    layers: list[int]
    """Layers measured (those whose mlp.hook_post the store holds)."""
    d_mlp: int
    n_tokens: int
    """Tokens the firing rates were measured on (BOS excluded when skip_bos)."""
    eps: float
    fire_def: str
    """Definition used for dead / always-on counts and the headline histogram."""
    definitions: dict[str, str]
    """Plain-words definition of every reported measure."""
    rates: dict[str, torch.Tensor]
    """definition -> [layer, d_mlp] per-neuron firing rate."""
    pplp: dict[str, Any]
    """PPL-p% point (cett, ppl_ratio, ratio, layer_ratio, thresholds, ...) and search trace; {} if off."""
    topk: dict[str, Any]
    """layers, score, dense_loss, rows (k, loss, ppl, delta_loss, top1_agree, active_ratio); {} if off."""
    held_tokens: int = 0
    """Tokens of held-out text the interventions were evaluated on (0 when both are off)."""

    def layer_ratio(self, definition: str) -> list[float]:
        return self.rates[definition].double().mean(-1).tolist()

    def overall(self, definition: str) -> float:
        return self.rates[definition].double().mean().item()

    def neuron_counts(self, definition: str | None = None) -> tuple[list[int], list[int]]:
        """Dead (rate 0) and always-on (rate 1) neurons per layer under `definition`."""
        rate = self.rates[definition or self.fire_def]
        return (rate == 0).sum(-1).tolist(), (rate == 1).sum(-1).tolist()

    def summary(self) -> list[dict]:
        """One row per layer plus an 'all' row: activation ratio under each definition, PPL-p%, neurons."""
        defs = [d for d in LABELS if d in self.rates]
        dead, on = self.neuron_counts()
        pplp = self.pplp.get("layer_ratio")
        rows = []
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = {"layer": str(layer)}  # one type per column (Arrow tables)
            row |= {f"ratio_{d}": self.rates[d][i].double().mean().item() for d in defs}
            if pplp:
                row["ratio_pplp"] = pplp[i]
            rows.append(row | {"dead": dead[i], "always_on": on[i]})
        total: dict[str, Any] = {"layer": "all"} | {f"ratio_{d}": self.overall(d) for d in defs}
        if pplp:
            total["ratio_pplp"] = self.pplp["ratio"]
        rows.append(total | {"dead": sum(dead), "always_on": sum(on)})
        return rows

    def figures(self) -> dict[str, Any]:
        figs = {"activation ratio by layer": self._ratio_figure(), "firing-rate histogram": self._histogram()}
        figs["dead and always-on neurons"] = self._neuron_figure()
        if self.topk:
            figs["top-k: loss vs k"] = self._topk_figure()
        if self.pplp:
            figs["PPL ratio vs CETT"] = self._pplp_figure()
        return figs

    def _label(self, definition: str) -> str:
        return f"|a| > ε = {self.eps:g}" if definition == "eps" else LABELS[definition]

    def _ratio_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        for d in LABELS:
            if d in self.rates:
                fig.add_scatter(
                    x=self.layers, y=self.layer_ratio(d), mode="lines+markers", name=self._label(d)
                )
        if self.pplp:
            name = f"PPL-{self.pplp['p']:g}% (CETT={self.pplp['cett']:.3g}, held text)"
            fig.add_scatter(x=self.layers, y=self.pplp["layer_ratio"], mode="lines+markers", name=name)
        fig.update_layout(
            title=f"activation ratio by layer, {self.model}",
            xaxis_title="layer",
            yaxis_title="activation ratio",
        )
        return fig

    def _histogram(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        for d in LABELS:
            if d in self.rates:
                rate = self.rates[d].flatten().tolist()
                fig.add_histogram(x=rate, name=self._label(d), nbinsx=50, opacity=0.6)
        fig.update_layout(
            barmode="overlay",
            yaxis_type="log",
            title="neuron firing frequency (all layers)",
            xaxis_title="fraction of tokens on which the neuron fires",
            yaxis_title="neurons",
        )
        return fig

    def _neuron_figure(self):
        import plotly.graph_objects as go

        dead, on = self.neuron_counts()
        fig = go.Figure()
        fig.add_bar(x=self.layers, y=dead, name="dead (never fires)")
        fig.add_bar(x=self.layers, y=on, name="always on (fires on every token)")
        fig.update_layout(
            barmode="group",
            title=f"dead and always-on neurons, firing = {self._label(self.fire_def)}",
            xaxis_title="layer",
            yaxis_title="neurons",
        )
        return fig

    def _topk_figure(self):
        rows = self.topk["rows"]
        fig = _two_axis_figure(
            [r["k"] for r in rows],
            ("loss", "loss (nats/token)", [r["loss"] for r in rows]),
            ("top-1 agreement", "top-1 agreement", [r["top1_agree"] for r in rows]),
            (self.topk["dense_loss"], "unmodified loss"),
        )
        fig.update_xaxes(type="log", title_text=f"k (of d_mlp = {self.d_mlp}) kept per token")
        fig.update_layout(title=f"top-k MLP activations at {len(self.topk['layers'])} layers")
        return fig

    def _pplp_figure(self):
        trace = sorted(self.pplp["trace"], key=lambda pt: pt["cett"])
        fig = _two_axis_figure(
            [pt["cett"] for pt in trace],
            ("PPL ratio", "PPL ratio (sparse / dense)", [pt["ppl_ratio"] for pt in trace]),
            ("activation ratio", "activation ratio", [pt["ratio"] for pt in trace]),
            (self.pplp["target_ratio"], "target"),
        )
        fig.update_xaxes(title_text="CETT")
        fig.update_layout(title=f"PPL-{self.pplp['p']:g}% search: perplexity ratio vs CETT")
        return fig


def _two_axis_figure(x, left, right, hline):
    """Two curves over one x, (name, axis title, y) each, the right one on a secondary axis, and a
    dotted reference line (y, label) on the left axis."""
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for (name, title, y), secondary in ((left, False), (right, True)):
        fig.add_scatter(x=x, y=y, mode="lines+markers", name=name, secondary_y=secondary)
        fig.update_yaxes(title_text=title, secondary_y=secondary)
    fig.add_hline(y=hline[0], line_dash="dot", annotation_text=hline[1])
    return fig
