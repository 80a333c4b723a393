"""Home: models, activation stores and cached results (searchable, newest first): what each result
was computed from, one-click re-open, and deleting results and stores after a confirm step."""

import time
from pathlib import Path

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages._common import guard

SHOWN = 25

st.title("Mechanistic interpretability workbench")
st.caption(
    "Everything here is also `workbench …` on the command line and `import workbench as wb` in Jupyter."
)
# What the last delete did (set by its callback), shown once.
if "home_notice" in st.session_state:
    st.success(st.session_state.pop("home_notice"))
if "home_error" in st.session_state:
    st.error(st.session_state.pop("home_error"))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


def _open(key: str) -> None:
    st.session_state["open_key"] = key


def _ask(key: str | None) -> None:
    st.session_state["delete_key"] = key


def _delete_result(key: str) -> None:
    """Confirmed: remove the entry; the in-memory copies go too, so nothing stale is served."""
    st.session_state.pop("delete_key", None)
    try:
        row = api.delete_result(key)
    except Exception as err:  # noqa: BLE001 - shown on the page, never a traceback
        st.session_state["home_error"] = f"cannot delete result {key[:12]}: {ui.message(err)}"
        return
    ui.result.clear()
    ui.figures.clear()
    st.session_state["home_notice"] = f"Deleted the {row['analysis']} result {key[:12]}."


def _delete_store(path: str) -> None:
    st.session_state.pop("delete_store", None)
    try:
        folder, kept = api.delete_store(path)
    except Exception as err:  # noqa: BLE001 - not a store, or a capture is writing it
        st.session_state["home_error"] = f"cannot delete store {path}: {ui.message(err)}"
        return
    note = f"Deleted the activation store {folder}."
    st.session_state["home_notice"] = note + (
        f" Kept files that are not the store's: {', '.join(kept)}." if kept else ""
    )


def _stores() -> None:
    stores = [s | {"created": _when(s["created"])} for s in api.list_stores()]
    if not stores:
        st.info("No activation stores yet: `workbench capture --help`.")
        return
    st.table(stores, hide_index=True, border="horizontal")
    with st.expander("Delete a store"):
        by_path = {s["path"]: s for s in stores}
        picked = st.selectbox(
            "Store",
            list(by_path),
            index=None,
            format_func=lambda p: f"{Path(p).name[:12]} · {by_path[p]['model']} · {by_path[p]['rows']} rows",
            placeholder="pick the store to delete",
            key="delete_store",
        )
        if picked:
            s = by_path[picked]
            st.warning(
                f"Delete {picked} ({s['model']}, {s['rows']} rows, {s['size_mb']} MB)? Results computed "
                "from it stay cached, but cannot be recomputed from it."
            )
            st.button(
                "Delete this store",
                type="primary",
                key="confirm_delete_store",
                on_click=_delete_store,
                args=(picked,),
            )


def _result_row(row: dict, about: dict) -> None:
    """One cached result: analysis, what it was computed from, when; Open and Delete (confirmed)."""
    key = row["key"]
    cols = st.columns([2, 5, 3, 1, 1], vertical_alignment="center")
    cols[0].markdown(f"**{row['analysis']}**")
    source = (
        f"store {about['from'][:12]}" if about["from"] != "capture" else f"captured from {about['model']}"
    )
    cols[1].caption(" · ".join(x for x in (source, about["site"], about["options"]) if x))
    cols[2].caption(f"{_when(row['created'])} · {row['duration'] or 0:.1f} s · `{key[:10]}`")
    if cols[3].button("Open", key=f"open-{key}", on_click=_open, args=(key,)):
        st.switch_page(Path(__file__).with_name("analyses.py"))
    cols[4].button("Delete", key=f"delete-{key}", on_click=_ask, args=(key,))
    if st.session_state.get("delete_key") == key:
        st.warning(f"Delete this {row['analysis']} result ({key[:12]})? Running it again recomputes it.")
        yes, no, _ = st.columns([1, 1, 6])
        yes.button("Yes, delete", type="primary", key="confirm_delete", on_click=_delete_result, args=(key,))
        no.button("Cancel", key="cancel_delete", on_click=_ask, args=(None,))


left, right = st.columns(2)
with left:
    st.subheader("Models")
    with guard("cannot list models"):
        st.table(api.list_models(), hide_index=True, border="horizontal")
with right:
    st.subheader("Activation stores")
    with guard("cannot list stores"):
        _stores()

st.subheader("Cached results")
search = st.text_input(
    "Search cached results", placeholder="analysis, model or any config value", key="search"
)
with guard("cannot list cached results"):
    rows = api.cached(text=search or None)
    about = {d["key"]: d for d in api.results_table(text=search or None)}  # keyed by 16-digit prefix
    if not rows:
        st.info(
            "No cached results"
            + (f" matching '{search}'." if search else " yet: run one on the Analyses page.")
        )
    for row in rows[:SHOWN]:
        if row["key"][:16] in about:  # else it was added between the two reads: next rerun shows it
            _result_row(row, about[row["key"][:16]])
    if len(rows) > SHOWN:
        st.caption(f"{len(rows) - SHOWN} more: narrow the search")
