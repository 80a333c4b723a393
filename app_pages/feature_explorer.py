"""Feature explorer: pick a trained or pretrained dictionary -> searchable latent list (by density,
by top tokens) -> latent page with the dashboard data (the `dashboards` analysis, cached), on the
store the dictionary was trained on when its cfg.json records one and it is here.

URL parameters: `?dictionary=<folder>&latent=<id>&store=<store folder>`; opening a URL with a new
`latent` jumps to it, and the page keeps `latent` in the URL as you move between latents."""

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages import _latent
from workbench.app_pages import _params as params

st.title("Feature explorer")


def _goto(j: int) -> None:
    st.session_state["latent"] = j
    st.query_params["latent"] = str(j)
    st.session_state["latent_param"] = str(j)  # the URL now says j: not a new request


def _picked(ids: list[int]) -> None:
    """A row clicked in the latent list opens that latent."""
    rows = st.session_state["latent_table"].selection.rows
    if rows:
        _goto(ids[rows[0]])


with st.sidebar:
    known = ui.dictionaries()
    picked = st.selectbox("Dictionary", known, format_func=lambda p: p.rstrip("/").rsplit("/", 1)[-1])
    typed = st.text_input("…or a dictionary folder", value=params.text("dictionary"), key="dictionary_path")
path = typed.strip() or picked
if not path:
    st.info(
        "No trained dictionaries yet: `workbench train-sae --help`, or give a SAELens folder in the sidebar."
    )
    st.stop()

info = None
with ui.guard("cannot read the dictionary"):
    info = api.dictionary_info(path)
if info is None:
    st.stop()
st.caption(f"{info['architecture']} · d_sae {info['d_sae']} · reads {info['site']} · {info['path']}")

stores = ui.stores_with(info["site"] or "")
stores = [s for s in stores if info["site"] in s["sites"]]
trained_on = api.dictionary_store(info["path"])  # first, so the picker opens on it
stores.sort(key=lambda s: s["path"] != trained_on)
with st.sidebar:
    store_path = ui.store_picker(stores)
if not store_path:
    st.error(
        f"No activation store holds {info['site']}: capture one with `workbench capture --sites {info['site']}`."
    )
    st.stop()

if trained_on and store_path == trained_on:
    st.caption(f"On the store it was trained on: {store_path}")
elif trained_on:
    st.caption(f"Trained on {trained_on}; showing another store: {store_path}")
else:
    st.caption(f"Its cfg.json names no store that is here; showing {store_path}")

# A run with the site left empty (the CLI default: the dictionary's own site) is the same data.
key = ui.cached_key("dashboards", store=store_path, site="", dictionary=info["path"]) or ui.cached_or_run(
    "dashboards", {"store": store_path, "site": info["site"], "dictionary": info["path"]}, "this dictionary"
)
if not key:
    st.stop()
res = None
with ui.guard("cannot load the dashboards"):
    res = ui.result(key)
if res is None:
    st.stop()

st.subheader("Latents")
cols = st.columns([3, 1, 1])
search = cols[0].text_input("Search top tokens / logits", placeholder="e.g. Paris", key="search")
order = cols[1].selectbox("Sort by", ["density", "max_act", "latent"])
hide_dead = cols[2].checkbox("hide dead", value=True)
rows = [
    r
    for r in ui.latent_table(key)
    if (not hide_dead or r["density"] > 0)
    and (not search or search.lower() in (r["top_tokens"] + " " + r["top_logits"]).lower())
]
rows.sort(key=lambda r: r[order], reverse=order != "latent")
shown = rows[:500]
st.dataframe(
    shown,
    hide_index=True,
    width="stretch",
    height=260,
    key="latent_table",
    on_select=lambda ids=[r["latent"] for r in shown]: _picked(ids),
    selection_mode="single-row",
)
st.caption(f"{len(rows)} of {res.n_latents} latents shown · click a row to open it")

first = rows[0]["latent"] if rows else 0
latent = params.unit_picker("latent", "Latent", first, int(res.n_latents) - 1, _goto)
own_text = {"model": res.model, "processing": api.open_store(store_path).config.get("processing", "raw"),
            "dictionary": info["path"]}  # fmt: skip
with ui.guard("cannot show this latent"):
    _latent.show(res, latent, "latent", _goto, own_text)
