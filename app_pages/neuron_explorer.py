"""Neuron explorer: store + layer + neuron -> max-activating contexts with token highlighting,
activation histogram, output-logit effect, and the most correlated neurons to jump to. Data from
the cached `dashboards` analysis over the store's MLP activations (computed on request), and a
box to test the neuron on your own text.

URL parameters: `?store=<store folder>&layer=<layer>&neuron=<id>`; opening a URL with a new
`neuron` jumps to it, and the page keeps `neuron` in the URL as you move between neurons."""

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages import _latent
from workbench.app_pages import _params as params

st.title("Neuron explorer")


def _goto(j: int) -> None:
    st.session_state["neuron"] = j
    st.query_params["neuron"] = str(j)
    st.session_state["neuron_param"] = str(j)  # the URL now says j: not a new request


stores = ui.stores_with("mlp.hook_post")
with st.sidebar:
    picked = ui.store_picker(stores)
    options = [s["path"] for s in stores]
    typed = st.text_input(
        "…or a store path",
        value="" if params.text("store") in options else params.text("store"),
        key="store_path",
    )
store_path = typed.strip() or picked
if not store_path:
    st.info(
        "No activation store holds MLP activations yet: `workbench capture --sites 'blocks.*.mlp.hook_post'`."
    )
    st.stop()

store = None
with ui.guard("cannot open the store"):
    store = api.open_store(store_path)
if store is None:
    st.stop()
mlp_sites = [s for s in store.sites if s.endswith("mlp.hook_post")]
if not mlp_sites:
    st.error(f"Store {store_path} holds no MLP activations (sites: {', '.join(store.sites)}).")
    st.stop()
layers = [int(s.split(".")[1]) for s in mlp_sites]
wanted = params.choice("layer", layers, layers[0])  # an error here shows in the main area
with st.sidebar:
    layer = st.selectbox("Layer", layers, index=layers.index(wanted))
site = f"blocks.{layer}.mlp.hook_post"
d_mlp = store.shape(site)[-1]
neuron = params.unit_picker("neuron", "Neuron", 0, d_mlp - 1, _goto)
st.caption(f"{site} of {store.config['model']} · {store.n_rows:,} tokens")

key = ui.cached_or_run("dashboards", {"store": store_path, "site": site, "dictionary": ""}, f"layer {layer}")
if key:
    with ui.guard("cannot show this neuron"):
        own_text = {"model": store.config["model"], "processing": store.config.get("processing", "raw")}
        _latent.show(ui.result(key), neuron, "neuron", _goto, own_text)
