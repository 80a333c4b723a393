"""Analyses: one generic page per registered analysis — a form generated from its config, Run in
the background with live progress, and the cached result's summary table and plotly figures."""

import time

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages import _params as params

st.title("Analyses")
names = ui.analysis_names()
if not names:
    st.error("No analyses are registered (is the `analyses` package importable?).")
    st.stop()

# A result re-opened from Home (session state) or linked by `?key=` selects its analysis.
open_key = st.session_state.pop("open_key", None) or params.result_key()
st.query_params.pop("key", None)  # consumed once, so the result picker below stays free
if open_key:
    with ui.guard(f"cannot open cached result {open_key[:12]}"):
        ui.result(open_key)
        row = next(r for r in api.cached() if r["key"] == open_key)
        st.session_state["analysis"] = row["analysis"]
        st.session_state["result"] = open_key

if st.session_state.get("analysis") not in names:
    st.session_state["analysis"] = params.choice("analysis", names, names[0])
name = st.selectbox("Analysis", names, key="analysis")
st.caption(next(a["doc"] for a in api.list_analyses() if a["name"] == name))


def _widget(f: dict, value, choices: tuple | None):
    """One form input: a selectbox for a field with fixed choices (`Literal[...]`), else by kind."""
    label, help_, key = f["name"], f["doc"] or None, f"field:{name}:{f['name']}"
    if choices:
        options = list(choices)
        index = options.index(value) if value in options else 0
        return st.selectbox(label, options, index=index, help=help_, key=key)
    if f["kind"] == "bool":
        return st.checkbox(label, value=str(value).lower() in ("1", "true", "yes"), help=help_, key=key)
    if f["kind"] == "int":
        return int(st.number_input(label, value=int(value), step=1, help=help_, key=key))
    if f["kind"] == "float":
        return float(st.number_input(label, value=float(value), format="%g", help=help_, key=key))
    return st.text_input(label, value=str(value), help=help_, key=key)


fields = api.config_fields(name)
choices = ui.field_choices(name, fields)
cached = api.cached(name)
# With a cached result the form folds away so the figures are in view; it opens when there is none.
with st.expander("Options · Run", expanded=not cached), st.form(f"form:{name}", border=False):
    cols = st.columns(2)
    values = {}
    for i, f in enumerate(fields):
        with cols[i % 2]:
            values[f["name"]] = _widget(f, params.field(f, choices.get(f["name"])), choices.get(f["name"]))
    force = st.checkbox("Recompute even if cached", value=False)
    submitted = st.form_submit_button("Run", type="primary")

if submitted:
    with ui.guard(f"cannot run {name}"):
        overrides = api.parse_form(name, values)
        api.make_config(name, **overrides)  # bad option values fail here, before a thread starts
        if force:
            overrides["force"] = True
        st.session_state[f"job:{name}"] = ui.start_job(name, overrides)

ui.follow_job(f"job:{name}", "result", name)

cached = api.cached(name)
if not cached:
    st.info(f"No cached {name} results yet: set the options above and press Run.")
    st.stop()
labels = {
    r["key"]: f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['created']))} · "
    f"{r['config'].get('store') or r['model'] or ''} · {r['key'][:10]}"
    for r in cached
}
if st.session_state.get("result") not in labels:
    st.session_state.pop("result", None)
key = st.selectbox("Cached result", list(labels), format_func=labels.get, key="result")
st.subheader(f"{name} · {key[:12]}")
with ui.guard("cannot show this result"):
    ui.show_result(key)
