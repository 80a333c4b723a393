"""Steering playground: pick a feature of any dictionary (an SNMF fit or an SAE), a target KL and a
prompt; α is calibrated to that KL and the plain and steered continuations are shown side by side.
Below, the cached steering comparisons (SNMF vs SAE vs diff-means at matched KL)."""

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui

st.title("Steering playground")
st.caption(
    "Adds α·v/‖v‖ at the dictionary's site at every position (v: the feature's decoder row; for an SNMF "
    "feature F[:,k] in neuron space at mlp.hook_post). α is found by bracketing and bisection so that the "
    "mean KL(plain ‖ steered) of next-token distributions over every position of your prompt and 10 open "
    "prompts is within 10 % of the target. Greedy decoding."
)


def _snmf_folders() -> list[str]:
    out = []
    for row in api.cached("snmf"):
        try:
            out.append(ui.result(row["key"]).dictionary)
        except Exception:  # noqa: BLE001 - a broken entry is just not offered
            continue
    return out


folders = list(dict.fromkeys(_snmf_folders() + ui.dictionaries()))
if not folders:
    st.info(
        "No dictionary yet: fit SNMF features on the SNMF page (or train an SAE), then steer with them here."
    )
    st.stop()

with st.form("steer-form"):
    folder = st.selectbox("Dictionary (SNMF fit or SAE)", folders)
    left, right = st.columns(2)
    with left:
        unit = int(st.number_input("Feature / latent", value=0, min_value=0, step=1))
        target = st.select_slider("Target KL", options=list(api.KL_TARGETS), value=0.1)
        sign = st.radio("Sign", ["+α", "−α"], horizontal=True)
    with right:
        model_key = st.text_input("Model (empty = the dictionary's)", value="")
        n_new = int(st.number_input("Tokens to generate", value=20, min_value=1, max_value=200))
    prompt = st.text_area("Prompt", value="I think that the best part of the day is")
    submitted = st.form_submit_button("Steer", type="primary")

if submitted:
    with ui.guard("cannot steer"):
        info = api.dictionary_info(folder)
        if unit >= int(info["d_sae"]):
            raise ValueError(f"feature {unit} is out of range: this dictionary has {info['d_sae']} features")
        sae = api.load_dictionary(folder)
        meta = sae.cfg.metadata
        key = model_key or (meta.get("workbench") or {}).get("model") or ui.DEFAULT_MODEL
        model = ui.model(key)
        with st.spinner("Calibrating α and generating…"):
            out = api.steer_text(
                model,
                sae.W_dec[unit].detach(),
                meta.hook_name,
                float(target),
                prompt,
                1 if sign == "+α" else -1,
                n_new,
            )
        st.session_state["steer-out"] = out | {"unit": unit, "folder": folder, "target": target}

out = st.session_state.get("steer-out")
if out:
    reached = "" if out["reached"] else " (target not reached within 10 %)"
    st.markdown(
        f"Feature **{out['unit']}** of `{out['folder']}`: α = {out['alpha']:+.3g} gives KL {out['kl']:.4f} "
        f"for target {out['target']}{reached}"
    )
    left, right = st.columns(2)
    left.markdown("**Plain**")
    left.code(out["plain"], language=None)
    right.markdown("**Steered**")
    right.code(out["steered"], language=None)

rows = api.cached("snmf-steering")
if rows:
    st.subheader("Steering comparisons at matched KL")
    key = ui.pick_result("snmf-steering", "steering-result", "")
    with ui.guard("cannot show this result"):
        r = ui.result(key)
        st.caption(
            "Rise of the concept's own tokens' probability (steered − plain); * = KL target not reached."
        )
        ui.show_result(key)
        if r.generations:
            st.markdown(
                f"**Examples** (+α at KL {r.generations[0]['kl']:.3f}); plain: `{r.plain_generation}`"
            )
            st.dataframe(
                [{k: g[k] for k in ("concept", "kind", "unit", "alpha", "steered")} for g in r.generations],
                hide_index=True,
            )
