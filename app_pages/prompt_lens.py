"""Prompt lens: type text, pick a model; tokens coloured by an MLP neuron, an SAE latent or the
residual-stream norm at a layer (hover for values; BOS left out of the colour scale, with a
legend); top neurons (by |activation|, sign shown) and latents at a clicked token, linked to their
explorer pages; the layer's attention pattern per head; a logit lens; next-token predictions.
One cached forward pass per (model, text, layer, dictionary).

URL parameters: model, text, layer, dictionary, mode (neuron | latent | norm), neuron, latent —
the Neuron and Feature explorers link back here with them."""

from urllib.parse import urlencode

import plotly.graph_objects as go
import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages import _params as params

DEFAULT_TEXT = "The capital of France is Paris. The capital of Germany is"
MODES = {"neuron": "MLP neuron", "latent": "SAE latent", "norm": "residual norm"}


@st.cache_data(max_entries=32, show_spinner="Running the model…")
def lens(model_key: str, text: str, layer: int, dictionary: str) -> dict:
    """Plain lists and floats only (no tensors in st.cache_data)."""
    return api.prompt_lens(ui.model(model_key), text, layer, dictionary=dictionary)


def _model_of(path: str) -> str | None:
    try:
        return api.dictionary_info(path)["model"]
    except Exception:  # noqa: BLE001 - unreadable folders are simply not matched
        return None


def _unit(key: str, label: str, n: int, live: int, marker: str) -> int:
    """A unit picker that opens on `live` (the unit most active on this prompt, never a dead unit
    0) whenever `marker` (model, text, layer, dictionary) changes; `?neuron=`/`?latent=` win once."""
    if st.session_state.get(f"{key}_for") != marker:
        first = f"{key}_for" not in st.session_state
        st.session_state[key] = params.integer(key, live, lo=0, hi=n - 1) if first else live
        st.session_state[f"{key}_for"] = marker
    return int(st.number_input(f"{label} (0..{n - 1})", min_value=0, max_value=n - 1, step=1, key=key))


st.title("Prompt lens")
first_layer = params.integer("layer", 0, lo=0)  # the model's own bound is checked by the lens
first_mode = params.choice("mode", list(MODES), "neuron")
with st.sidebar:
    model_key = st.text_input(
        "Model",
        value=params.text("model", ui.DEFAULT_MODEL),
        help="A model key, local HF folder or Hub id",
        key="model",
    )
    layer = int(st.number_input("Layer", min_value=0, value=first_layer, step=1))
    mode = st.radio("Colour tokens by", list(MODES.values()), index=list(MODES).index(first_mode), key="mode")
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
marker = f"{model_key}|{text}|{layer}|{dictionary}"
if mode == MODES["neuron"]:
    d_mlp = len(view["neurons"][0])
    unit = _unit("neuron", "Neuron", d_mlp, view["first_neuron"], marker)
    values, what = [row[unit] for row in view["neurons"]], f"neuron L{layer}/N{unit} (mlp.hook_post)"
elif mode == MODES["latent"] and view["latents"] is not None:
    d_sae = len(view["latents"][0])
    unit = _unit("latent", "Latent", d_sae, view["first_latent"], marker)
    values, what = [row[unit] for row in view["latents"]], f"latent {unit} of {view['latent_site']}"
else:
    if mode == MODES["latent"]:
        st.warning("Give a dictionary folder in the sidebar to colour by SAE latents; showing residual norm.")
    values, what = view["resid_norm"], f"residual-stream norm after layer {layer}"

shown = view.show(values, what)  # BOS left out of the colour scale; legend below the tokens
st.html(shown.html())
scale = max((abs(v) for i, v in enumerate(values) if i not in shown.exclude), default=0.0)

picked = st.pills(
    "Click a token to see its top neurons, latents and predictions",
    range(n_pos),
    default=n_pos - 1,
    format_func=lambda i: tokens[i].replace("\n", "↵") or "∅",
    key="pos",
)
st.html(ui.pill_colours("pos", [max(-scale, min(v, scale)) for v in values]))  # same colours as above
pos = n_pos - 1 if picked is None or picked >= n_pos else picked
st.caption(f"token {pos}: {tokens[pos]!r} = {values[pos]:.4g}")


def _link(page: str, **query) -> str:
    return f"{page}?{urlencode(query)}"


LINK = st.column_config.LinkColumn("page", display_text="open")
cols = st.columns(3)
with cols[0]:
    st.subheader("Top neurons")
    st.caption("Ranked by |activation|, sign kept: gated (SwiGLU) neurons take both signs.")
    st.dataframe(
        [
            {
                "neuron": i,
                "activation": a,
                "sign": "+" if a >= 0 else "−",
                "page": _link("neuron_explorer", layer=layer, neuron=i),
            }
            for i, a in view["top_neurons"][pos]
        ],
        hide_index=True,
        width="stretch",
        column_config={"page": LINK},
        key="top_neurons",
    )
with cols[1]:
    st.subheader("Top latents")
    if view["top_latents"] is None:
        st.caption("No dictionary given.")
    else:
        st.caption(f"of the dictionary at {view['latent_site']}")
        st.dataframe(
            [
                {
                    "latent": i,
                    "activation": a,
                    "page": _link("feature_explorer", dictionary=dictionary.strip(), latent=i),
                }
                for i, a in view["top_latents"][pos]
                if a > 0
            ],
            hide_index=True,
            width="stretch",
            column_config={"page": LINK},
            key="top_latents",
        )
with cols[2]:
    st.subheader("Next-token predictions")
    st.table(view["predictions"][pos], hide_index=True, border="horizontal")

left, right = st.columns(2)
with left:
    st.subheader("Attention pattern")
    n_heads = len(view["attention"])
    head = int(st.selectbox("Head", range(n_heads), key="head", format_func=lambda h: f"L{layer}H{h}"))
    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(
        go.Heatmap(z=view["attention"][head], x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1)
    )
    fig.update_layout(
        xaxis_title="key (attended to)",
        yaxis_title="query",
        yaxis_autorange="reversed",
        height=420,
        margin={"t": 10, "l": 10, "r": 10, "b": 10},
    )
    st.plotly_chart(fig, key="attention", width="stretch")
with right:
    st.subheader("Logit lens")
    st.caption(
        f"Top next tokens at token {pos} read from each layer's residual stream (hook_resid_post) "
        "through the model's final norm, then the unembedding W_U; the last layer is the model's own prediction."
    )
    st.dataframe(
        [
            {
                "layer": i,
                **{f"#{j + 1}": f"{p['token']!r} {p['prob']:.2f}" for j, p in enumerate(per_pos[pos])},
            }
            for i, per_pos in enumerate(view["logit_lens"])
        ],
        hide_index=True,
        width="stretch",
        key="logit_lens",
    )
