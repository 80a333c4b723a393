"""Helpers shared by the app's pages: the cached model handle, error display, background analysis
jobs with live progress, token highlighting, and cached result loading.

Streamlit reruns the whole page script on every interaction, so everything expensive is cached:
the model in `st.cache_resource(max_entries=1)` (a rerun never reloads it, streamlit#5998),
loaded results by cache key in `st.cache_resource` (tensors are never pickled into
`st.cache_data`), and analysis runs happen in a background thread the page polls.
"""

from __future__ import annotations

import json
import threading
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import streamlit as st

from workbench import api
from workbench.app_pages import _params as params

DEFAULT_MODEL = "smollm2-135m"


# --- errors ------------------------------------------------------------------------------
def message(err: BaseException) -> str:
    """One readable line for an exception (KeyError's repr quotes are dropped)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(text) or err.__class__.__name__


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show any error raised inside as `st.error`, never a traceback; the rest of the page renders."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every failure a user can cause lands here
        st.error(f"{what}: {message(err)}")


# --- cached resources --------------------------------------------------------------------
@st.cache_resource(max_entries=1, show_spinner="Loading model…")
def model(key: str):
    """The one model handle of this server process; switching models releases the previous one."""
    return api.load_model(key)


@st.cache_resource(max_entries=16, show_spinner=False)
def result(key: str):
    """A cached result by key, loaded once per server process."""
    return api.load(key)


@st.cache_resource(max_entries=16, show_spinner=False)
def figures(key: str) -> dict:
    return result(key).figures()


@st.cache_resource(max_entries=4, show_spinner=False)
def latent_table(key: str) -> list[dict]:
    """A dashboards result's one-row-per-latent table, built once per result."""
    return result(key).table()


def cached_key(name: str, **overrides: Any) -> str | None:
    """The cache key of `name` with these options if that result is already computed, else None."""
    if name not in analysis_names():
        return None
    key = api.key_for(name, api.make_config(name, **overrides))
    return key if any(r["key"] == key for r in api.cached(name)) else None


def field_choices(name: str, fields: list[dict]) -> dict[str, tuple]:
    """Form fields of analysis `name` with a fixed set of values -> those values: the `choices`
    that config_fields gives, else the field's `Literal[...]` hint."""
    hints = typing.get_type_hints(type(api.make_config(name)))
    found = {}
    for f in fields:
        hint = hints.get(f["name"])
        allowed = f.get("choices") or (typing.get_args(hint) if typing.get_origin(hint) is Literal else ())
        if allowed:
            found[f["name"]] = tuple(allowed)
    return found


def analysis_names() -> list[str]:
    return [a["name"] for a in api.list_analyses()]


# --- background jobs ---------------------------------------------------------------------
@dataclass
class Job:
    """One analysis run in a background thread; the page polls its fields."""

    name: str
    overrides: dict[str, Any]
    done: int = 0
    total: int = 0
    status: str = "running"
    error: str = ""
    key: str = ""
    started: float = field(default_factory=time.time)

    def progress(self, i: int, total: int) -> None:
        self.done, self.total = i, total

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0


@st.cache_resource
def _jobs() -> dict[str, Job]:
    return {}


def job_id(name: str, overrides: dict[str, Any]) -> str:
    return name + ":" + json.dumps(overrides, sort_keys=True, default=str)


def start_job(name: str, overrides: dict[str, Any]) -> str:
    """Run `api.run(name, **overrides)` in a thread (once per identical request); returns the job id."""
    jid = job_id(name, overrides)
    jobs = _jobs()
    if jid in jobs and jobs[jid].status == "running":
        return jid
    job = jobs[jid] = Job(name, overrides)

    def work() -> None:
        try:
            job.key = api.run(name, progress=job.progress, **overrides).cache_key
            job.status = "done"
        except Exception as err:  # noqa: BLE001 - shown to the user by the polling page
            job.error, job.status = message(err), "failed"

    threading.Thread(target=work, name=f"workbench-{name}", daemon=True).start()
    return jid


def job(jid: str) -> Job | None:
    return _jobs().get(jid)


def poll(jid: str, every: float = 0.5) -> None:
    """Live progress of a running job; reruns the whole page once it finishes."""

    @st.fragment(run_every=every)
    def panel() -> None:
        j = job(jid)
        if j is None or j.status != "running":
            st.rerun()
        label = f"{j.name}: {j.done}/{j.total}" if j.total else f"{j.name}: starting…"
        st.progress(j.fraction, text=f"{label} ({time.time() - j.started:.0f} s)")

    panel()


def follow_job(job_state: str, result_state: str, label: str) -> None:
    """The page's background job (its id in `st.session_state[job_state]`): progress while it
    runs, its error if it failed, and once done its result key in `st.session_state[result_state]`."""
    jid = st.session_state.get(job_state)
    j = job(jid) if jid else None
    if j is not None and j.status == "running":
        poll(jid)
    elif j is not None and j.status == "failed":
        st.error(f"{label} failed: {j.error}")
    elif j is not None and j.status == "done":
        st.session_state[result_state] = j.key
        st.session_state.pop(job_state)


def pick_result(name: str, state: str, empty: str) -> str:
    """A selectbox over the cached results of analysis `name`, newest first, kept in
    st.session_state[state]; the chosen key. Shows `empty` and stops the page when there are none."""
    rows = api.cached(name)
    if not rows:
        st.info(empty)
        st.stop()
    keys = [r["key"] for r in rows]
    if st.session_state.get(state) not in keys:
        st.session_state[state] = keys[0]
    return st.selectbox(
        "Result",
        keys,
        key=state,
        format_func=lambda k: next(
            f"{r['key'][:12]} · {r.get('model')} · {r.get('created', '')}" for r in rows if r["key"] == k
        ),
    )


# --- rendering ---------------------------------------------------------------------------
def token_html(
    tokens: list[str], values: list[float], vmax: float | None = None, mark: int | None = None
) -> str:
    """Tokens as spans coloured by value (orange positive, blue negative); hover shows the value;
    the token at `mark` (e.g. the max-activating one) is outlined. One renderer with the prompt
    lens and Jupyter (workbench.highlight)."""
    vmax = vmax if vmax is not None else api.token_scale(values)
    return api.token_spans(tokens, values, vmax, mark)


def pill_colours(key: str, values: list[float]) -> str:
    """CSS giving the i-th pill of the `st.pills` with this key the colour of values[i]."""
    vmax = max((abs(v) for v in values), default=0.0)
    rules = [
        f".st-key-{key} button:nth-of-type({i + 1}){{background:{api.token_colour(v, vmax)};font-family:monospace}}"
        for i, v in enumerate(values)
    ]
    return "<style>" + "".join(rules) + "</style>"


SHOWN_FIGURES = 2


def show_result(key: str) -> None:
    """A cached result's summary table and plotly figures."""
    res = result(key)
    rows = res.summary()
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch", height=min(35 * len(rows) + 38, 300))
    figs = figures(key)
    names = list(figs)
    shown = st.pills(  # the first two drawn at once; every chart drawn costs the page ~0.1 s
        "Figures", names, selection_mode="multi", default=names[:SHOWN_FIGURES], key=f"figs-{key[:12]}"
    )
    cols = st.columns(2)
    for i, name in enumerate(n for n in names if n in shown):
        with cols[i % 2]:
            st.plotly_chart(figs[name], key=f"fig-{key[:12]}-{names.index(name)}", width="stretch")


def cached_or_run(name: str, overrides: dict[str, Any], what: str) -> str | None:
    """The cache key of `name(**overrides)` if computed; else a Run button and live progress."""
    if name not in analysis_names():
        st.warning(f"The '{name}' analysis is not installed in this workbench.")
        return None
    key = cached_key(name, **overrides)
    if key:
        return key
    jid = job_id(name, overrides)
    j = job(jid)
    if j is not None and j.status == "running":
        poll(jid)
        return None
    if j is not None and j.status == "failed":
        st.error(f"{name} failed: {j.error}")
    st.info(f"No cached {name} result for {what} yet.")
    if st.button(f"Compute {name} for {what}", type="primary", key=f"run-{jid}"):
        start_job(name, overrides)
        st.rerun()
    return None


def stores_with(site_filter: str = "") -> list[dict]:
    """Stores (newest first) that hold a site containing `site_filter`."""
    rows = []
    for row in api.list_stores():
        try:
            sites = api.open_store(row["path"]).sites
        except Exception:  # noqa: BLE001 - a damaged store is just not offered
            continue
        if any(site_filter in s for s in sites):
            rows.append(row | {"sites": sites})
    return rows


def store_picker(stores: list[dict]) -> str | None:
    """Sidebar select of stores (preselected from the `store` query parameter), labelled by model and size."""
    options = [s["path"] for s in stores]
    labels = {
        s["path"]: f"{s['path'].rsplit('/', 1)[-1][:12]} · {s['model']} · {s['rows']} rows" for s in stores
    }
    wanted = params.text("store")
    return st.selectbox(
        "Activation store",
        options,
        index=options.index(wanted) if wanted in options else 0,
        format_func=labels.get,
    )


def dictionaries() -> list[str]:
    """Dictionary folders: saved under $WORKBENCH_HOME/dictionaries, or named by train-sae results."""
    found = [d["path"] for d in api.list_dictionaries()]
    for row in api.cached("train-sae"):
        try:
            fields = vars(result(row["key"]))
        except Exception:  # noqa: BLE001 - a broken entry is just not offered
            continue
        for value in fields.values():
            if isinstance(value, str) and value not in found:
                try:
                    api.dictionary_info(value)
                    found.append(value)
                except Exception:  # noqa: BLE001 - not a dictionary folder
                    pass
    return found
