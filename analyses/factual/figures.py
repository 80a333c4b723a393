"""Plotly figures of a factual-recall result (pure functions of its fields; no I/O)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.analyses.factual.aggregate import TOKEN_TYPES
from workbench.analyses.factual.result import NOT_TRACED, TRACE_NAMES

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def all_figures(result) -> dict[str, Any]:
    figs = {}
    if result.traces.numel():
        figs = {"Traces: fact 1": fact_traces(result, 0), "AIE by token type": aie_curves(result)}
    if "heads" in result.mech:
        figs["Head DLA and mover heads"] = heads(result)
        figs["Final-layer suppression"] = suppression(result)
    return figs


def fact_traces(result, i: int) -> go.Figure:
    """Heat-maps token x layer of P(attribute) with one state restored, one per kind (ROME Fig. 1)."""
    row = result.rows[i]
    n = len(row["labels"])
    kinds = TRACE_NAMES[: result.traces.shape[1]]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
    labels = [
        f"{p}:{t!r}" + ("*" if row["start"] <= p < row["end"] else "") for p, t in enumerate(row["labels"])
    ]
    for k, kind in enumerate(kinds, 1):
        z = result.traces[i, k - 1, :, :n].T  # [pos, layer]: tokens down the side as in ROME
        z = [[None if v == NOT_TRACED else v for v in r] for r in z.tolist()]
        fig.add_trace(
            go.Heatmap(
                z=z, x=list(range(result.n_layers)), y=labels, zmin=0, zmax=1, colorscale="Purples",
                showscale=k == len(kinds), hovertemplate="%{y}<br>layer %{x}<br>P %{z:.4f}<extra>" + kind + "</extra>",
            ),
            row=1, col=k,
        )  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="layer")
    p_clean, p_corr = float(result.p_clean[i]), float(result.p_corrupted[i])
    fig.update_layout(
        title=f"{row['prompt']!r} -> {row['attribute']!r}: P clean {p_clean:.3f}, corrupted {p_corr:.3f} "
        f"(* subject; window {result.window})",
        height=200 + 22 * n,
    )
    return fig


def aie_curves(result) -> go.Figure:
    """AIE by layer per token type with 95 % CI bands, one panel per state kind (ROME Fig. 2)."""
    kinds = TRACE_NAMES[: result.aie.shape[0]]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
    layers = list(range(result.n_layers))
    for k in range(1, len(kinds) + 1):
        for t, name in enumerate(TOKEN_TYPES):
            mean, ci = result.aie[k - 1, t], result.aie_ci[k - 1, t]
            if not result.aie_n[k - 1, t].any():
                continue
            fig.add_trace(
                go.Scatter(
                    x=layers, y=mean.tolist(), name=name, legendgroup=name, showlegend=k == 1,
                    line={"color": COLORS[t]}, error_y={"type": "data", "array": ci.tolist(), "thickness": 1},
                ),
                row=1, col=k,
            )  # fmt: skip
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="AIE", row=1, col=1)
    fig.update_layout(
        title=f"Average indirect effect over {len(result.rows)} facts (ATE {result.ate():.4f})", height=420
    )
    return fig


def heads(result) -> go.Figure:
    """Mean direct logit attribution of each head, and the path-patching effect of mean-ablating it."""
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=["head DLA", "path patching (Δ logit)", "attention to subject"]
    )
    for col, (key, scale) in enumerate((("heads", "RdBu"), ("path", "RdBu"), ("subject_attn", "Purples")), 1):
        z = result.mech[key].mean(0)
        lim = float(z.abs().max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=z.tolist(), x=[f"H{h}" for h in range(result.n_heads)], y=list(range(result.n_layers)),
                zmin=-lim if scale == "RdBu" else 0, zmax=lim, colorscale=scale, showscale=False,
                hovertemplate="layer %{y} %{x}<br>%{z:.4f}<extra>" + key + "</extra>",
            ),
            row=1, col=col,
        )  # fmt: skip
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title="Heads at the last position (mean over facts)", height=200 + 14 * result.n_layers)
    return fig


def suppression(result) -> go.Figure:
    """Per-layer DLA of attention and MLP at the last position, and P with the final suppressors removed."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["DLA per layer (last position)", "P(attribute)"])
    layers = list(range(result.n_layers))
    for key, name in (("attn_last", "attention"), ("mlp_last", "MLP")):
        fig.add_trace(go.Bar(x=layers, y=result.mech[key].mean(0).tolist(), name=name), row=1, col=1)
    p = result.mech["suppression"]
    facts = [f"{r['row']}" for r in result.rows]
    fig.add_trace(go.Bar(x=facts, y=p[:, 0].tolist(), name="clean"), row=1, col=2)
    fig.add_trace(go.Bar(x=facts, y=p[:, 1].tolist(), name="suppressors removed"), row=1, col=2)
    removed = ", ".join(result.suppressors.get("removed", [])) or "none"
    fig.update_layout(
        title=f"Final-layer suppression {result.suppressors.get('suppression', 0.0):.3f} logits; removed: {removed}",
        barmode="group",
        height=420,
    )
    return fig
