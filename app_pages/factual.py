"""Factual recall: type a fact (or pick a fact set), trace it in the background (cached), and see its
causal traces (hidden / MLP / attention), the AIE curves, the heads and the final-layer suppression."""

import streamlit as st

from workbench import api
from workbench import facts as fact_sets
from workbench.app_pages import _common as ui

NAME = "factual"
SETS = ["known", "relations", "relations-cf"]

st.title("Factual recall")
st.caption(
    "ROME causal tracing (noise on the subject's embeddings, one clean state restored at a time) and "
    "the mechanisms of Lv et al. 2024: head DLA, mover heads by path patching, the MLP regression and "
    "the final layer's suppression of the answer."
)
defaults = {f["name"]: f["default"] for f in api.config_fields(NAME)}

with (
    st.expander("Fact and options · Run", expanded=not api.cached(NAME)),
    st.form("factual-form", border=False),
):
    source = st.radio("Facts", ["Type a fact", "A fact set"], horizontal=True)
    left, right = st.columns(2)
    with left:
        subject = st.text_input("Subject", value="Eiffel Tower")
        prompt = st.text_input("Prompt", value="The Eiffel Tower is located in the city of")
        attribute = st.text_input("Attribute", value="Paris")
        fact_set = st.selectbox("Fact set", SETS)
        n_facts = int(
            st.number_input("Facts from the set", value=int(defaults["n_facts"]), min_value=0, step=1)
        )
    with right:
        model = st.text_input("Model", value=defaults["model"])
        samples = int(st.number_input("Noise draws", value=int(defaults["samples"]), min_value=1, step=1))
        noise = float(st.number_input("Noise (x std of subject embeddings)", value=float(defaults["noise"])))
        positions = st.radio("Positions", ["all", "types"], horizontal=True)
        severed = st.checkbox("Severed variant", value=True)
        mechanisms = st.checkbox("Mechanisms (DLA, mover heads, suppression)", value=True)
    submitted = st.form_submit_button("Run", type="primary")

if submitted:
    overrides = {"model": model, "samples": samples, "noise": noise, "positions": positions}
    overrides |= {"severed": severed, "mechanisms": mechanisms}
    with ui.guard("cannot trace"):
        if source == "Type a fact":  # a typed fact is traced even when the model gets it wrong
            fact_sets.subject_span([prompt], subject, "typed fact", prompt)  # subject check before the model
            overrides |= {"facts": fact_sets.typed_file(subject, prompt, attribute), "n_facts": 1}
            overrides["known_only"] = False
        else:
            overrides |= {"facts": fact_set, "n_facts": n_facts}
        api.make_config(NAME, **overrides)  # bad options fail here, before a thread starts
        st.session_state["factual-job"] = ui.start_job(NAME, overrides)

ui.follow_job("factual-job", "factual-result", "factual tracing")

key = ui.pick_result(NAME, "factual-result", "No traces yet: type a fact or pick a set above and press Run.")

with ui.guard("cannot show this result"):
    result = ui.result(key)
    known = f"{result.n_checked - len(result.unknown)} of {result.n_checked} facts checked are known"
    st.markdown(
        f"**{len(result.rows)} facts** traced on `{result.model}` ({known}); noise {result.noise} x sigma "
        f"{result.sigma:.4f}, {result.samples} draws, window {result.window} layers"
        + (f"; ATE {result.ate():.4f}" if result.traces.numel() else "")
    )
    if result.unknown:
        with st.expander(f"{len(result.unknown)} facts skipped: the model does not know them"):
            st.dataframe(result.unknown, hide_index=True)
    figs = ui.figures(key)
    if result.traces.numel():
        labels = [f"{r['row']}: {r['prompt']} -> {r['attribute']}" for r in result.rows]
        i = st.selectbox("Fact", range(len(labels)), format_func=lambda j: labels[j])
        st.plotly_chart(result.fact_figure(i), key=f"trace-{key}-{i}")
        sites = result.sites()
        st.markdown(
            " · ".join(
                f"{name} site: **{'yes' if s['present'] else 'no'}** (peak AIE {s['aie']:.4f} ± {s['ci']:.4f} "
                f"at layer {s['layer']})"
                for name, s in sites.items()
            )
        )
        st.dataframe(result.summary(), hide_index=True)
        st.plotly_chart(figs["AIE by token type"], key=f"aie-{key}")
    if "heads" in result.mech:
        st.plotly_chart(figs["Head DLA and mover heads"], key=f"heads-{key}")
        st.caption("Top mover heads (path patching, Δ attribute logit when mean-ablated):")
        st.dataframe(result.top_movers(), hide_index=True)
        st.plotly_chart(figs["Final-layer suppression"], key=f"supp-{key}")
        st.dataframe(result.suppression_table(), hide_index=True)
        reg = result.regression
        if reg.get("layer", -1) >= 0:
            st.markdown(
                f"Function application: MLP {reg['layer']} regressed on the upstream heads, R² {reg['r2']:.3f}; "
                f"its intercept through the unembedding puts the attributes at median rank {reg['median_rank']:.0f}; "
                f"top tokens: {', '.join(repr(t) for t in reg['top_tokens'])}"
            )
