"""Home: models, activation stores and cached results (searchable, newest first, one-click re-open)."""

import time
from pathlib import Path

import streamlit as st

from workbench import api
from workbench.app_pages._common import guard

st.title("Mechanistic interpretability workbench")
st.caption(
    "Everything here is also `workbench …` on the command line and `import workbench as wb` in Jupyter."
)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


def _open(key: str) -> None:
    st.session_state["open_key"] = key


left, right = st.columns(2)
with left:
    st.subheader("Models")
    with guard("cannot list models"):
        st.table(api.list_models(), hide_index=True, border="horizontal")
with right:
    st.subheader("Activation stores")
    with guard("cannot list stores"):
        stores = [s | {"created": _when(s["created"])} for s in api.list_stores()]
        if stores:
            st.table(stores, hide_index=True, border="horizontal")
        else:
            st.info("No activation stores yet: `workbench capture --help`.")

st.subheader("Cached results")
search = st.text_input(
    "Search cached results", placeholder="analysis, model or any config value", key="search"
)
with guard("cannot list cached results"):
    rows = api.cached(text=search or None)
    if not rows:
        st.info(
            "No cached results"
            + (f" matching '{search}'." if search else " yet: run one on the Analyses page.")
        )
    for row in rows[:25]:
        cols = st.columns([2, 4, 3, 1], vertical_alignment="center")
        cols[0].markdown(f"**{row['analysis']}**")
        cols[1].caption(row["model"] or row["config"].get("store", ""))
        cols[2].caption(f"{_when(row['created'])} · {row['duration'] or 0:.1f} s · `{row['key'][:10]}`")
        if cols[3].button("Open", key=f"open-{row['key']}", on_click=_open, args=(row["key"],)):
            st.switch_page(Path(__file__).with_name("analyses.py"))
    if len(rows) > 25:
        st.caption(f"{len(rows) - 25} more: narrow the search")
