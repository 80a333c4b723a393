"""URL query parameters, validated: links into a page prefill it (`?layer=3&neuron=17`), and a value
a page cannot use shows one `st.error` line naming the parameter, is dropped from the URL (so the
message goes once the user moves on) and the page carries on with its default. Never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

RESULT_KEY = re.compile(r"[0-9a-f]{64}")  # sha256 hex, the only shape a results-cache key has
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _reject(name: str, raw: str, why: str, default: Any) -> Any:
    shown = f"; showing {default}" if default not in (None, "") else ""
    st.error(f"URL parameter {name}={raw!r} {why}{shown}.")
    del st.query_params[name]
    return default


def text(name: str, default: str = "") -> str:
    """A free-text parameter (a model key, a path, a prompt): checked by whatever reads it."""
    return st.query_params.get(name, default)


def integer(name: str, default: int, lo: int | None = 0, hi: int | None = None) -> int:
    """An integer parameter within [lo, hi] (either bound optional)."""
    raw = st.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return _reject(name, raw, "is not a whole number", default)
    if lo is not None and hi is not None and not lo <= value <= hi:
        return _reject(name, raw, f"is out of range ({lo}..{hi})", default)
    if lo is not None and value < lo:
        return _reject(name, raw, f"is below {lo}", default)
    if hi is not None and value > hi:
        return _reject(name, raw, f"is above {hi}", default)
    return value


def number(name: str, default: float) -> float:
    raw = st.query_params.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        return _reject(name, raw, "is not a number", default)


def flag(name: str, default: bool) -> bool:
    raw = st.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in TRUE + FALSE:
        return raw.lower() in TRUE
    return _reject(name, raw, "is not true or false", default)


def choice(name: str, choices: Sequence[Any], default: Any) -> Any:
    """One of `choices` (compared as text, since a URL carries text; the choice itself is returned)."""
    raw = st.query_params.get(name)
    if raw is None:
        return default
    by_text = {str(c): c for c in choices}
    if raw in by_text:
        return by_text[raw]
    return _reject(name, raw, f"is not one of {', '.join(by_text)}", default)


def result_key(name: str = "key") -> str | None:
    """A results-cache key (64 hex digits); anything else never reaches the cache's file paths."""
    raw = st.query_params.get(name)
    if raw is None:
        return None
    if RESULT_KEY.fullmatch(raw):
        return raw
    return _reject(name, raw, "is not a result key (64 hex digits)", None)


def field(f: dict[str, Any], choices: Sequence[Any] | None) -> Any:
    """The prefill of analysis form field `f` (a config_fields row) from the parameter of its name."""
    name, default = f["name"], f["default"]
    if choices:
        return choice(name, choices, default)
    if f["kind"] == "int":
        return integer(name, int(default), lo=None)
    if f["kind"] == "float":
        return number(name, float(default))
    if f["kind"] == "bool":
        return flag(name, bool(default))
    return text(name, str(default))


def unit_picker(name: str, label: str, first: int, hi: int, goto: Callable[[int], None]) -> int:
    """The unit number box (0..hi) in st.session_state[name]: opened on ?<name>= when the URL names
    a unit (also mid-session, when the parameter changes), else on `first`; `goto` on every change."""
    asked = st.query_params.get(name)
    if name not in st.session_state or (asked is not None and asked != st.session_state.get(f"{name}_param")):
        st.session_state[name] = integer(name, first, lo=0, hi=hi)
        st.session_state[f"{name}_param"] = asked
    return int(
        st.number_input(
            f"{label} (0..{hi})",
            min_value=0,
            step=1,
            key=name,
            on_change=lambda: goto(int(st.session_state[name])),
        )
    )
