"""Config checks shared by the capture and every analysis config: fixed choices and sizes.

A field typed `Literal[...]` is a choice (the CLI offers `click.Choice`, the app a selectbox);
numbers are never negative, and the names in `positive` must be above zero. Both run when a
config is built, so a bad option fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal


def choices(hint: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` hint (None for any other type)."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_config(cfg: Any, positive: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field whose value is outside its choices or sign."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = choices(hints.get(f.name))
        if allowed is not None and value not in allowed:
            raise ValueError(f"{f.name} must be one of {list(allowed)}, got '{value}'")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if f.name in positive and value <= 0:
            raise ValueError(f"{f.name} must be positive, got {value}")
        if value < 0:
            raise ValueError(f"{f.name} must not be negative, got {value}")
