"""One neuron's or latent's dashboard, drawn from a cached `dashboards` result: firing numbers (and
the firing rule), top positive and — for units that take both signs — top negative contexts with
each example's activation, activation histogram, output-logit effect, neighbours, and a box to
test the unit on your own text. The layout follows the feature pages researchers know (Bricken et
al. 2023 → sae_vis → SAEDashboard → Neuronpedia). It reads the plain-Python view `result.latent(i)`.
"""

from __future__ import annotations

import html
from collections.abc import Callable

import plotly.graph_objects as go
import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui


def histogram(hist: dict, i: int, unit: str, signed: bool) -> go.Figure:
    counts, edges = hist["counts"], hist["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    fig = go.Figure(go.Bar(x=centres, y=counts, width=[b - a for a, b in zip(edges, edges[1:])]))
    what = "all scanned tokens, both signs" if signed else "where > 0"
    fig.update_layout(
        title=f"activations of {unit} {i} ({what})",
        xaxis_title="activation",
        yaxis_title="tokens",
        yaxis_type="log" if signed else "linear",
        height=280,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def _logit_rows(pairs: list) -> list[dict]:
    return [{"token": t, "logit effect": round(v, 4)} for t, v in pairs]


def _contexts(ctxs: list[dict], vmax: float | None) -> None:
    """All contexts in one HTML element (one element per context makes the page slow to draw),
    each led by its example's activation."""
    st.html(
        "".join(
            '<div style="display:flex;gap:0.6em;align-items:baseline">'
            f'<code style="min-width:5.5em;text-align:right">{_value(c)}</code>'
            + ui.token_html(c["tokens"], c["acts"], vmax=vmax, mark=c.get("max_index"))
            + "</div>"
            for c in ctxs
        )
    )


def _value(ctx: dict) -> str:
    """The example's activation (at the marked token), signed."""
    return html.escape(format(ctx["act"], "+.4g"))


def _numbers(d: dict, res) -> None:
    cols = st.columns(4)
    cols[0].metric("density", f"{d['density']:.3%}")
    cols[1].metric("max activation", f"{d['max_act']:.4g}")
    cols[2].metric("mean |activation| (when firing)", f"{d['mean_act']:.4g}")
    cols[3].metric("tokens scanned", f"{int(res.n_tokens):,}")
    if d.get("signed"):
        st.caption(
            f"Signed unit (min {d['min_act']:.4g}): fires when |a| > {d['fire_threshold']:.4g} — "
            f"above on {d['density'] - d['density_neg']:.3%} of tokens, below on {d['density_neg']:.3%}."
        )
    st.caption(f"Firing rule: {getattr(res, 'firing_rule', 'a unit fires when a > 0')}.")


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


def show(res, i: int, unit: str, on_neighbour: Callable[[int], None], own_text: dict | None = None) -> None:
    """Draw the dashboard of unit `i` from `res.latent(i)`; neighbour buttons call `on_neighbour(j)`.
    `own_text` (model, processing, dictionary) adds the "test it on your own text" box."""
    n = int(res.n_latents)
    if not 0 <= i < n:
        st.error(f"{unit} {i} is out of range: this result has {unit}s 0..{n - 1}")
        return
    d = res.latent(i)
    _numbers(d, res)
    vmax = max(d["max_act"], -d.get("min_act", 0.0)) or None
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Max-activating contexts")
        if not d["top"]:
            st.info(f"This {unit} never fired on the scanned tokens.")
        _contexts(d["top"], vmax)
        if d.get("negative"):
            st.subheader("Most negative contexts")
            _contexts(d["negative"], vmax)
        _quantile_samples(d.get("quantiles", []), vmax, f"{unit}-{i}")
    with right:
        st.plotly_chart(
            histogram(d["hist"], i, unit, d.get("signed", False)), key=f"hist-{unit}-{i}", width="stretch"
        )
        up, down = st.columns(2)
        up.caption("promoted tokens (logit effect)")
        up.table(_logit_rows(d["pos_logits"]), hide_index=True, border="horizontal")
        down.caption("suppressed tokens")
        down.table(_logit_rows(d["neg_logits"]), hide_index=True, border="horizontal")
        if getattr(res, "logit_note", ""):
            st.caption(res.logit_note)
    if own_text is not None:
        _own_text(res, i, unit, own_text)
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


def _own_text(res, i: int, unit: str, where: dict) -> None:
    """A text box: the model runs on it and each token is coloured by this unit's activation."""
    st.subheader(f"Test this {unit} on your own text")
    with st.form(key=f"own-{unit}"):
        text = st.text_area("Text", key=f"own-text-{unit}", height=80)
        go_ = st.form_submit_button("Run the model on it")
    if go_:
        with ui.guard(f"cannot run this {unit} on the text"):
            model = api.load_model(where["model"], where.get("processing", "raw"))
            st.session_state[f"own-out-{unit}"] = (
                (res.site, i),
                api.unit_activations(model, text, res.site, i, dictionary=where.get("dictionary", "")),
            )
    st.page_link(
        "prompt_lens.py",
        label=f"Open this {unit} in the prompt lens",
        icon=":material/open_in_new:",
        query_params=_lens_params(res, i, unit, where, text),
    )
    shown = st.session_state.get(f"own-out-{unit}")
    if shown and shown[0] == (res.site, i):
        out = shown[1]
        first = 1 if len(out["acts"]) > 1 else 0  # BOS (an attention sink) is not the answer
        top = max(range(first, len(out["acts"])), key=lambda p: abs(out["acts"][p]))
        st.html(
            ui.token_html(
                out["tokens"], out["acts"], vmax=float(max(res.max_act[i], -res.min_act[i])) or None, mark=top
            )
        )
        st.caption(
            f"{unit} {i} of {out['site']}: strongest {out['acts'][top]:+.4g} on {out['tokens'][top]!r}; "
            "colours on the dashboard's scale (orange > 0, blue < 0); hover a token for its value."
        )


def _lens_params(res, i: int, unit: str, where: dict, text: str) -> dict[str, str]:
    """The prompt lens's URL parameters for this unit (and the typed text, if any)."""
    layer = res.site.split(".")[1] if res.site.startswith("blocks.") else "0"
    out = {"model": res.model, "layer": layer, "mode": unit, unit: str(i)}
    if where.get("dictionary"):
        out["dictionary"] = where["dictionary"]
    return out | ({"text": text} if text.strip() else {})


def _neighbour_row(pairs, label: str, stat: str, i: int, unit: str, on_neighbour, help: str) -> None:
    """One row of buttons labelled "#j · r 0.74"; keys are nb-<r|cos>-<unit>-<i>-<j>."""
    st.caption(f"{label} ({stat}; click to open)" + ("" if pairs else ": none"))
    cols = st.columns(max(len(pairs), 1))
    for col, (j, v) in zip(cols, pairs):
        col.button(
            f"#{j} · {stat} {v:.2f}",
            key=f"nb-{stat}-{unit}-{i}-{j}",
            on_click=on_neighbour,
            args=(j,),
            help=f"{unit} {j}: {help}",
        )
