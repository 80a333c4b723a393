"""Plotly figures of a bigram-subnetwork result (pure functions of its fields; no I/O)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = {"full": "#1f77b4", "subnetwork": "#d62728"}


def all_figures(result) -> dict[str, Any]:
    figs = {
        "Kept weights by layer and matrix": kept_heatmap(result),
        "Ablation: mean surprisal": ablation_bars(result),
    }
    if result.scatter_bigram.numel():
        figs["Surprisal: subnetwork vs bigram"] = surprisal_scatter(result)
    if result.covsim_full.numel():
        figs["Current- vs next-token alignment by layer"] = alignment_lines(result)
        figs["Layer covariance similarity"] = covariance_heatmaps(result)
    return figs


def kept_heatmap(result) -> go.Figure:
    """Share of all kept entries in each (layer, matrix), with the kept fraction of that matrix in
    the hover: where the subnetwork concentrates (the paper: the first MLP)."""
    layers, kinds, kept, size = result.by_layer_kind()
    share = kept.double() / max(int(kept.sum()), 1)
    frac = kept.double() / size.clamp(min=1)
    hover = [
        [
            f"layer {layer} {kind}<br>{int(kept[i, j])} of {int(size[i, j])} kept ({float(frac[i, j]):.3%})"
            f"<br>share of all kept: {float(share[i, j]):.1%}"
            for j, kind in enumerate(kinds)
        ]
        for i, layer in enumerate(layers)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=share.tolist(),
            x=kinds,
            y=[str(layer) for layer in layers],
            colorscale="Reds",
            zmin=0,
            hovertext=hover,
            hoverinfo="text",
            colorbar={"title": "share of kept", "tickformat": ".0%"},
        )
    )
    fig.update_layout(
        title=f"Kept weights: {result.n_kept:,} of {result.n_maskable:,} ({result.kept_fraction:.3%}); "
        f"layer-0 MLP holds {result.first_mlp_share:.1%}",
        xaxis_title="matrix",
        yaxis_title="layer",
        yaxis_autorange="reversed",
    )
    return fig


def ablation_bars(result) -> go.Figure:
    """Mean held-out surprisal (nats) of each variant, ± one standard deviation across tokens."""
    rows = result.ablation
    fig = go.Figure(
        go.Bar(
            x=[r["variant"] for r in rows],
            y=[r["mean_surprisal"] for r in rows],
            error_y={"type": "data", "array": [r["std_surprisal"] for r in rows]},
            text=[f"{r['mean_surprisal']:.2f}" for r in rows],
            hovertext=[f"kept fraction {r['kept_fraction']:.3%}" for r in rows],
        )
    )
    fig.update_layout(title="Ablation: mean surprisal on held-out text", yaxis_title="surprisal (nats)")
    return fig


def surprisal_scatter(result) -> go.Figure:
    """Per-token surprisal of the subnetwork against the bigram model's (finite bigram values)."""
    x, y = result.scatter_bigram.tolist(), result.scatter_masked.tolist()
    top = max(max(x), max(y))
    fig = go.Figure(go.Scattergl(x=x, y=y, mode="markers", marker={"size": 3, "opacity": 0.4}, name="tokens"))
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dash"}, name="y = x"))
    fig.update_layout(
        title=f"Surprisal: r = {result.r_bigram:.3f} over {result.n_r:,} tokens "
        f"({result.n_inf_dropped:,} with infinite bigram surprisal dropped)",
        xaxis_title="bigram surprisal (nats)",
        yaxis_title="subnetwork surprisal (nats)",
    )
    return fig


def alignment_lines(result) -> go.Figure:
    """Covariance similarity of each residual site to the embeddings (current token) and to the last
    block's output (next-token space), full model vs subnetwork."""
    fig = go.Figure()
    for name, values in result.alignment().items():
        who, space = name.split(": ")
        fig.add_trace(
            go.Scatter(
                x=list(range(len(values))),
                y=values.tolist(),
                name=name,
                line={"color": COLORS[who], "dash": "solid" if space == "next token" else "dot"},
            )
        )
    fig.update_layout(
        title="Residual stream: similarity to current- vs next-token space",
        xaxis_title="site (0 = embeddings, l = after block l−1)",
        yaxis_title="covariance similarity",
    )
    return fig


def covariance_heatmaps(result) -> go.Figure:
    """Site × site covariance similarity, full model and subnetwork side by side."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["full model", "subnetwork"], shared_yaxes=True)
    for col, sim in enumerate((result.covsim_full, result.covsim_sub), 1):
        fig.add_trace(
            go.Heatmap(z=sim.tolist(), zmin=0, zmax=1, colorscale="Viridis", showscale=col == 2), 1, col
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Layer covariance similarity (site 0 = embeddings)")
    return fig
