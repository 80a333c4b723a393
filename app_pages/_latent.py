"""One neuron's or latent's dashboard, drawn from a cached `dashboards` result: summary numbers,
max-activating contexts with token highlighting, activation histogram, output-logit effect and
neighbours. The layout follows the feature pages researchers know (Bricken et al. 2023 →
sae_vis → SAEDashboard → Neuronpedia). It reads the plain-Python view `result.latent(i)`: top
contexts, quantile samples, logits, neighbours, histogram.
"""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go
import streamlit as st

from workbench.app_pages import _common as ui


def histogram(hist: dict, i: int, unit: str) -> go.Figure:
    counts, edges = hist["counts"], hist["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    fig = go.Figure(go.Bar(x=centres, y=counts, width=[b - a for a, b in zip(edges, edges[1:])]))
    fig.update_layout(
        title=f"activations of {unit} {i} (where > 0)",
        xaxis_title="activation",
        yaxis_title="tokens",
        height=280,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def _logit_rows(pairs: list) -> list[dict]:
    return [{"token": t, "logit effect": round(v, 4)} for t, v in pairs]


def _contexts(ctxs: list[dict], vmax: float | None) -> None:
    """All contexts in one HTML element (one element per context makes the page slow to draw)."""
    st.html("".join(ui.token_html(c["tokens"], c["acts"], vmax=vmax, mark=c.get("max_index")) for c in ctxs))


def _numbers(d: dict, res) -> None:
    cols = st.columns(4)
    cols[0].metric("density", f"{d['density']:.3%}")
    cols[1].metric("max activation", f"{d['max_act']:.4g}")
    cols[2].metric("mean activation (when firing)", f"{d['mean_act']:.4g}")
    cols[3].metric("tokens scanned", f"{int(res.n_tokens):,}")


def _quantile_samples(quantiles: list[dict], vmax: float | None, key: str) -> None:
    """Samples from one activation interval at a time, picked from a list (drawing every
    interval at once doubled the page's render time for little gain)."""
    filled = [q for q in reversed(quantiles) if q["contexts"]]
    if not filled:
        return
    labels = [
        f"({q['bin_min']:.3g}, {q['bin_max']:.3g}] · {q['bin_contains']:.1%} of firings" for q in filled
    ]
    picked = st.selectbox(
        "Samples from the activation interval",
        range(len(filled)),
        format_func=labels.__getitem__,
        index=None,
        placeholder="pick an interval to see random contexts from it",
        key=f"quantile-{key}",
    )
    if picked is not None:
        _contexts(filled[picked]["contexts"], vmax)


def show(res, i: int, unit: str, on_neighbour: Callable[[int], None]) -> None:
    """Draw the dashboard of unit `i` from `res.latent(i)`; neighbour buttons call `on_neighbour(j)`."""
    n = int(res.n_latents)
    if not 0 <= i < n:
        st.error(f"{unit} {i} is out of range: this result has {unit}s 0..{n - 1}")
        return
    d = res.latent(i)
    _numbers(d, res)
    vmax = d["max_act"] or None
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Max-activating contexts")
        if not d["top"]:
            st.info(f"This {unit} never fired on the scanned tokens.")
        _contexts(d["top"], vmax)
        _quantile_samples(d.get("quantiles", []), vmax, f"{unit}-{i}")
    with right:
        st.plotly_chart(histogram(d["hist"], i, unit), key=f"hist-{unit}-{i}", width="stretch")
        up, down = st.columns(2)
        up.caption("promoted tokens (output-logit effect)")
        up.table(_logit_rows(d["pos_logits"]), hide_index=True, border="horizontal")
        down.caption("suppressed tokens")
        down.table(_logit_rows(d["neg_logits"]), hide_index=True, border="horizontal")
        if getattr(res, "logit_note", ""):
            st.caption(res.logit_note)
    st.subheader("Neighbours")
    _neighbour_row(
        d.get("correlated", []),
        "most correlated",
        "r",
        i,
        unit,
        on_neighbour,
        "Pearson correlation of the activations over the scanned tokens; click to open it",
    )
    _neighbour_row(
        d["neighbors"],
        "nearest output direction",
        "cos",
        i,
        unit,
        on_neighbour,
        "cosine of the output directions (decoder rows or W_out rows); click to open it",
    )


def _neighbour_row(pairs, label: str, stat: str, i: int, unit: str, on_neighbour, help: str) -> None:
    """One row of buttons; keys are nb-<r|cos>-<unit>-<i>-<j>."""
    st.caption(f"{label} ({stat})" + ("" if pairs else ": none"))
    cols = st.columns(max(len(pairs), 1))
    for col, (j, v) in zip(cols, pairs):
        col.button(
            f"{unit} {j} ({v:+.2f})",
            key=f"nb-{stat}-{unit}-{i}-{j}",
            on_click=on_neighbour,
            args=(j,),
            help=help,
        )
