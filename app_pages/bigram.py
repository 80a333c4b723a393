"""Bigram subnetworks: pick a trained mask's cached result and see where its kept weights lie, how
bigram-like it is, what ablating it costs and how the residual stream moves from the current-token
to the next-token space (Chang & Bergen 2025)."""

import streamlit as st

from workbench.app_pages import _common as ui

NAME = "bigram-subnetwork"

st.title("Bigram subnetworks")
st.caption(
    "The smallest weight mask that turns the model into a bigram predictor P(next token | current "
    "token), found by continuous sparsification (Chang & Bergen 2025, arXiv 2504.15471). Training "
    f"takes a while: run it from the command line, `workbench run {NAME} --model smollm2-135m`, "
    "and its result appears here."
)

key = ui.pick_result(NAME, "bigram-result", f"No bigram subnetworks yet: `workbench run {NAME}` trains one.")

with ui.guard("cannot show this result"):
    result = ui.result(key)
    figs = ui.figures(key)
    cols = st.columns(4)
    cols[0].metric(
        "Kept weights", f"{result.kept_fraction:.3%}", f"{result.n_kept:,} entries", delta_color="off"
    )
    cols[1].metric("In layer-0 MLP", f"{result.first_mlp_share:.1%}", "of kept entries", delta_color="off")
    cols[2].metric(
        "Surprisal r with bigram", f"{result.r_bigram:.3f}", f"{result.n_r:,} tokens", delta_color="off"
    )
    cols[3].metric(
        "CE to bigram (nats)", f"{result.ce_bigram:.3f}", f"full model {result.ce_bigram_full:.3f}"
    )
    if result.held_out:
        st.markdown(f"Evaluated on `{result.model}`, held-out text: {result.held_out}")
    st.plotly_chart(figs["Kept weights by layer and matrix"], key=f"kept-{key}")
    st.subheader("Ablation")
    st.dataframe(result.ablation, hide_index=True)
    st.plotly_chart(figs["Ablation: mean surprisal"], key=f"ablation-{key}")
    for title in ("Surprisal: subnetwork vs bigram", "Current- vs next-token alignment by layer"):
        if title in figs:
            st.plotly_chart(figs[title], key=f"{title}-{key}")
    if "Layer covariance similarity" in figs:
        with st.expander("Layer × layer covariance similarity"):
            st.plotly_chart(figs["Layer covariance similarity"], key=f"covsim-{key}")
    with st.expander("What each number counts"):
        st.markdown(
            "- **Kept weights**: kept entries / entries of every attention and MLP weight matrix; "
            "biases, norms, embeddings and the unembedding are never masked and not counted.\n"
            "- **In layer-0 MLP**: the share of all kept entries that lie in the first block's MLP "
            "matrices (the paper finds most of them there).\n"
            "- **Surprisal r**: Pearson r between the subnetwork's per-token surprisal −ln q(x_{t+1}) and "
            "the corpus bigram model's −ln P(x_{t+1} | x_t) on held-out text; tokens whose bigram "
            "probability is 0 (no smoothing) are dropped, as the reference's `ngram_corr_dropinf`.\n"
            "- **CE to bigram**: mean over held-out positions of −Σ_w P_bigram(w | x_t) ln q(w), in nats.\n"
            "- **Ablation**: mean ± std of surprisal (nats; infinite values set to the largest finite "
            "one) for the full model, the subnetwork alone, its complement (full model minus the "
            "subnetwork), random masks keeping the same number of entries in every matrix, and their "
            "complements.\n"
            "- **Alignment**: cosine similarity between the covariance matrices of residual-stream "
            "sites over held-out tokens (BOS excluded); site 0 is the embeddings (current-token space), "
            "the last site is the last block's output before the final norm (next-token space)."
        )
