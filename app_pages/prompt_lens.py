"""Prompt lens: type text, pick a model; tokens coloured by an MLP neuron, an SAE latent or the
residual-stream norm at a layer (hover for values); top neurons and latents at a clicked token;
next-token predictions. One cached forward pass per (model, text, layer, dictionary)."""

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages import _params as params

DEFAULT_TEXT = "The capital of France is Paris. The capital of Germany is"


@st.cache_data(max_entries=32, show_spinner="Running the model…")
def lens(model_key: str, text: str, layer: int, dictionary: str) -> dict:
    """Plain lists and floats only (no tensors in st.cache_data)."""
    return api.prompt_lens(ui.model(model_key), text, layer, dictionary=dictionary)


def _model_of(path: str) -> str | None:
    try:
        return api.dictionary_info(path)["model"]
    except Exception:  # noqa: BLE001 - unreadable folders are simply not matched
        return None


st.title("Prompt lens")
first_layer = params.integer("layer", 0, lo=0)  # the model's own bound is checked by the lens
with st.sidebar:
    model_key = st.text_input(
        "Model",
        value=params.text("model", ui.DEFAULT_MODEL),
        help="A model key, local HF folder or Hub id",
        key="model",
    )
    layer = int(st.number_input("Layer", min_value=0, value=first_layer, step=1))
    mode = st.radio("Colour tokens by", ["MLP neuron", "SAE latent", "residual norm"], key="mode")
    known = ui.dictionaries()
    # offer the first dictionary trained on this model (others would not fit its activations)
    fits = [d for d in known if _model_of(d) == model_key.strip()]
    dictionary = st.text_input(
        "Dictionary folder (SAE / transcoder)",
        value=params.text("dictionary", fits[0] if fits else ""),
        help="SAELens-format folder (cfg.json + safetensors); trained ones: " + (", ".join(known) or "none"),
        key="dictionary",
    )
text = st.text_area("Text", value=params.text("text", DEFAULT_TEXT), height=90, key="text")

view = None
with ui.guard("cannot run the prompt lens"):
    ui.model(model_key.strip())  # an unknown model fails here, once
    try:
        view = lens(model_key.strip(), text, layer, dictionary.strip())
    except Exception as err:
        if not dictionary.strip():
            raise
        st.error(f"dictionary not used: {ui.message(err)}")  # still show neurons and predictions
        view = lens(model_key.strip(), text, layer, "")
if view is None:
    st.stop()

tokens, n_pos = view["tokens"], len(view["tokens"])
if mode == "MLP neuron":
    d_mlp = len(view["neurons"][0])
    unit = int(st.number_input(f"Neuron (0..{d_mlp - 1})", 0, d_mlp - 1, value=0, key="neuron"))
    values, what = [row[unit] for row in view["neurons"]], f"neuron L{layer}/N{unit} (mlp.hook_post)"
elif mode == "SAE latent" and view["latents"] is not None:
    d_sae = len(view["latents"][0])
    unit = int(st.number_input(f"Latent (0..{d_sae - 1})", 0, d_sae - 1, value=0, key="latent"))
    values, what = [row[unit] for row in view["latents"]], f"latent {unit} of {view['latent_site']}"
else:
    if mode == "SAE latent":
        st.warning("Give a dictionary folder in the sidebar to colour by SAE latents; showing residual norm.")
    values, what = view["resid_norm"], f"residual-stream norm after layer {layer}"

st.markdown(f"**{what}** · max {max(values):.4g} · min {min(values):.4g}")
st.html(ui.token_html(tokens, values))

picked = st.pills(
    "Click a token to see its top neurons, latents and predictions",
    range(n_pos),
    default=n_pos - 1,
    format_func=lambda i: tokens[i].replace("\n", "↵") or "∅",
    key="pos",
)
st.html(ui.pill_colours("pos", values))  # the clickable tokens carry the same colours
pos = n_pos - 1 if picked is None or picked >= n_pos else picked
st.caption(f"token {pos}: {tokens[pos]!r} = {values[pos]:.4g}")
cols = st.columns(3)
with cols[0]:
    st.subheader("Top neurons")
    st.table(
        [{"neuron": i, "activation": a} for i, a in view["top_neurons"][pos]],
        hide_index=True,
        width="stretch",
    )
with cols[1]:
    st.subheader("Top latents")
    if view["top_latents"] is None:
        st.caption("No dictionary given.")
    else:
        st.caption(f"of the dictionary at {view['latent_site']}")
        st.table(
            [{"latent": i, "activation": a} for i, a in view["top_latents"][pos] if a > 0],
            hide_index=True,
            width="stretch",
        )
with cols[2]:
    st.subheader("Next-token predictions")
    st.table(view["predictions"][pos], hide_index=True, border="horizontal")
