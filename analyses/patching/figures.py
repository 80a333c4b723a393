"""Plotly figures of a patching result (pure functions of its fields; no I/O)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

NAMES = {"ap": "AP", "atp": "AtP", "relp": "RelP", "ig": "IG"}


def all_figures(result) -> dict[str, Any]:
    figs = {f"{c}: methods side by side": side_by_side(result, c) for c in result.components}
    if "ap" in result.methods:
        for m in result.methods:
            if m != "ap":
                figs[f"{NAMES[m]} vs AP"] = scatter(result, m)
    if result.feature_top:
        figs["Feature attribution: top latents"] = top_latents(result)
    return figs


def top_latents(result) -> go.Figure:
    """Per feature-attribution method: task-mean score of its top latents and of the error node."""
    methods = list(result.feature_top)
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=[NAMES[m] for m in methods])
    for i, m in enumerate(methods, 1):
        top = result.feature_top[m]
        x = [f"L{t['latent']}" for t in top] + ["error"]
        y = [t["score"] for t in top] + [float(result.features[f"{m}/error"].mean())]
        colors = ["steelblue"] * len(top) + ["grey"]
        fig.add_trace(go.Bar(x=x, y=y, marker_color=colors, name=NAMES[m], showlegend=False), row=1, col=i)
    site = ", ".join(f"{NAMES[m]} {float(result.features[f'{m}/site'].mean()):.4f}" for m in methods)
    fig.update_layout(
        title=f"Dictionary latents at {result.feature_hooks[-1]}: effect on {result.metric} (site total: {site})",
        height=420,
    )
    return fig


def side_by_side(result, component: str) -> go.Figure:
    """One heat-map per method: layer x position (token labels) or layer x head."""
    methods = result.methods
    fig = make_subplots(
        rows=1, cols=len(methods), subplot_titles=[NAMES[m] for m in methods], shared_yaxes=True
    )
    for i, m in enumerate(methods, 1):
        z = result.map(m, component)
        if component == "heads_pos":
            z = z.sum(1)  # [layer, pos]: summed over heads for the overview; per head in the app
        x = _x_labels(result, component, z.shape[-1])
        lim = float(z.abs().max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=z.tolist(),
                x=x,
                y=list(range(result.n_layers)),
                zmin=-lim,
                zmax=lim,
                colorscale="RdBu",
                showscale=i == len(methods),
                name=NAMES[m],
                hovertemplate="layer %{y}<br>%{x}<br>score %{z:.4f}<extra>" + NAMES[m] + "</extra>",
            ),
            row=1,
            col=i,
        )
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=f"{component}: effect on {result.metric} ({result.direction})", height=420)
    return fig


def _x_labels(result, component: str, n: int) -> list[str]:
    if component == "heads":
        return [f"H{h}" for h in range(n)]
    return [f"{p}:{t!r}" for p, t in enumerate(result.labels[-n:])]


def scatter(result, method: str) -> go.Figure:
    """Each cell of the method's maps against AP's, one colour per component type, r in the legend."""
    r = result.pearson().get(method, {})
    fig = go.Figure()
    for c in result.components:
        x, y = result.map("ap", c).flatten(), result.map(method, c).flatten()
        fig.add_trace(
            go.Scatter(
                x=x.tolist(), y=y.tolist(), mode="markers", name=f"{c} (r={r.get(c, float('nan')):.3f})"
            )
        )
    lo = min(0.0, *(float(result.map("ap", c).min()) for c in result.components))
    hi = max(0.0, *(float(result.map("ap", c).max()) for c in result.components))
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "grey"})
    )
    fig.update_layout(
        title=f"{NAMES[method]} vs activation patching", xaxis_title="AP", yaxis_title=NAMES[method]
    )
    return fig
