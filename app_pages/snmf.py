"""SNMF features: fit (in the background, cached) and read each feature: its top contexts with the
coefficient on every token, its neurons, its vocabulary projection, its density, its neighbours."""

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui

NAME = "snmf"

st.title("SNMF features")
st.caption(
    "Semi-nonnegative matrix factorisation of MLP activations (Shafran, Geiger, Geva 2025): "
    "A ≈ G Fᵀ with each feature F[:,k] a sparse combination of neurons and G ≥ 0 its coefficient per "
    "token. The fit is saved as a dictionary: the Feature explorer, dashboards, prompt lens and the "
    "Steering playground read it like an SAE."
)
defaults = {f["name"]: f["default"] for f in api.config_fields(NAME)}
stores = ui.stores_with("mlp.hook_post")

with (
    st.expander("Store and options · Run", expanded=not api.cached(NAME)),
    st.form("snmf-form", border=False),
):
    store = ui.store_picker(stores) if stores else None
    left, right = st.columns(2)
    with left:
        rank = int(st.number_input("Rank (features)", value=int(defaults["rank"]), min_value=1, step=1))
        sparsity = float(
            st.number_input("Sparsity (fraction of neurons per feature)", value=float(defaults["sparsity"]))
        )
    with right:
        n_tokens = int(
            st.number_input("Tokens fitted (0 = all)", value=int(defaults["n_tokens"]), min_value=0)
        )
        max_iter = int(st.number_input("Most iterations", value=int(defaults["max_iter"]), min_value=1))
    submitted = st.form_submit_button("Run", type="primary")

if submitted:
    with ui.guard("cannot fit"):
        if not store:
            raise ValueError("no store with an mlp.hook_post site: capture one with `workbench capture`")
        overrides = {
            "store": store,
            "rank": rank,
            "sparsity": sparsity,
            "n_tokens": n_tokens,
            "max_iter": max_iter,
        }
        api.make_config(NAME, **overrides)  # bad options fail here, before a thread starts
        st.session_state["snmf-job"] = ui.start_job(NAME, overrides)

ui.follow_job("snmf-job", "snmf-result", "SNMF fit")
key = ui.pick_result(NAME, "snmf-result", "No SNMF fit yet: pick a store above and press Run.")

with ui.guard("cannot show this result"):
    r = ui.result(key)
    if r.warning:
        st.warning(r.warning)
    st.markdown(
        f"**{r.rank} features** of `{r.site}` on `{r.model}`: {r.n_tokens} tokens, sparsity {r.sparsity:g} "
        f"(⌈p·{r.d_mlp}⌉ neurons per feature), {r.n_iter} iterations, FVU {r.fvu:.3f}. "
        f"Dictionary: `{r.dictionary}`"
    )
    st.caption(f"{r.rows_note}. Density: {r.density_rule}.")
    ui.show_result(key)
    if r.tree:
        st.markdown(
            f"**Concept tree** (Hierarchical SNMF, ranks {' > '.join(map(str, r.tree_ranks))}; features = level 1)"
        )
        st.dataframe(r.tree_rows(), hide_index=True)
    k = st.selectbox(
        "Feature", range(r.rank), format_func=lambda i: f"f{i} · density {float(r.density[i]):.3f}"
    )
    st.subheader(f"Feature {k}")
    cols = st.columns(3)
    cols[0].metric("Density", f"{float(r.density[k]):.3f}")
    cols[1].metric("Max G", f"{float(r.max_coef[k]):.3f}")
    cols[2].metric("Mean G", f"{float(r.mean_coef[k]):.4f}")
    st.markdown("**Top activating contexts** (colour = G of this feature; the activating token outlined)")
    vmax = float(r.max_coef[k]) or None
    for j in range(int((r.top_rows[k] >= 0).sum())):
        tokens, values = r.context(k, j)
        mark = r.window_before - int((r.ctx_tokens[k, j, : r.window_before] < 0).sum())
        st.markdown(
            f"`{float(r.top_coefs[k, j]):.3f}` " + ui.token_html(tokens, values, vmax, mark),
            unsafe_allow_html=True,
        )
    left, right = st.columns(2)
    with left:
        st.markdown("**Vocabulary projection** (W_U · norm(W_outᵀ F[:,k]))")
        st.dataframe(
            {
                "promotes": r.logit_tokens(k, True),
                "suppresses": r.logit_tokens(k, False),
            },
            hide_index=True,
        )
        st.caption(r.logit_note)
    with right:
        st.markdown("**Neurons** (largest |F[:,k]|)")
        st.dataframe(
            {"neuron": r.neuron_ids[k].tolist(), "weight": [round(float(w), 4) for w in r.neuron_weights[k]]},
            hide_index=True,
        )
        near = [(int(i), float(c)) for i, c in zip(r.neighbors[k], r.neighbor_cos[k], strict=True) if i >= 0]
        st.markdown(
            "**Nearest features** (cosine of F columns): " + ", ".join(f"f{i} ({c:.2f})" for i, c in near[:5])
        )
