"""Declared inputs: which config fields point at data, and what each kind of input is, by content.

An analysis config marks its inputs with `input_field(kind)`; each kind knows its content
fingerprint and the canonical spelling of its value (an absolute resolved path, no trailing
slash). Cache keys are built from `canonical_config` and `fingerprints` only, never by guessing
from field names, so `store=runs/a`, `store=/abs/runs/a/` and `store=./runs/a` are one key and
retraining a dictionary in place changes the key.

    @dataclass(frozen=True)
    class MyConfig:
        store: str = input_field("store")
        model: str = captured("smollm2-135m")     # describes the capture; superseded by `store`
        data: str = captured(default_factory=default_source, kind="data")

`captured` fields describe how a store would be captured when none is given. When the config's
store is set they are taken from the store's run.json; a value that differs from the store's is
an `InputConflictError` ("--model gemma-3-270m conflicts with the store (captured from
smollm2-135m); drop --model or pick another store"), never a silently mislabelled result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

_KINDS: dict[str, tuple[Callable[[str], Any], Callable[[str], str]]] = {}
_UNSET = dataclasses.MISSING


class InputConflictError(ValueError):
    """An option that contradicts the store it is combined with."""


def input_field(kind: str, default: Any = "", **kw) -> dataclasses.Field:
    """A dataclass field declaring an input of `kind` (store, model, data, dictionary, task...).

    `kw` goes to `dataclasses.field` (e.g. `default_factory`); an empty value means "not set"."""
    metadata = {**kw.pop("metadata", {}), "input": kind}
    if "default_factory" in kw:
        return dataclasses.field(metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def captured(
    default: Any = _UNSET, *, key: str | None = None, kind: str | None = None, store: str = "store", **kw
) -> dataclasses.Field:
    """A field describing the capture that `store` (a field of kind "store") supersedes when set.

    `key` names the store's run.json config entry it corresponds to (default: the field's own
    name); `kind` additionally declares it an input (fingerprinted only when no store is set)."""
    metadata = {**kw.pop("metadata", {}), "captured": {"store": store, "key": key}}
    if kind:
        metadata["input"] = kind
    if default is not _UNSET:
        kw["default"] = default
    return dataclasses.field(metadata=metadata, **kw)


def register_kind(
    kind: str, fingerprint: Callable[[str], Any], canonical: Callable[[str], str] | None = None
) -> None:
    """Teach the layer a kind of input: its content fingerprint and canonical value spelling."""
    _KINDS[kind] = (fingerprint, canonical or (lambda value: value))


def kind_of(field: dataclasses.Field) -> str | None:
    return field.metadata.get("input")


def declared_inputs(cfg_or_cls: Any) -> dict[str, str]:
    """Field name -> input kind, for every declared input of a config (class or instance)."""
    return {f.name: f.metadata["input"] for f in dataclasses.fields(cfg_or_cls) if "input" in f.metadata}


def _kind(kind: str) -> tuple[Callable[[str], Any], Callable[[str], str]]:
    if kind not in _KINDS:
        raise KeyError(f"unknown input kind '{kind}'; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind]


def superseded(cfg: Any) -> set[str]:
    """Captured fields whose store is set: the store's fingerprint already covers them."""
    return {
        f.name
        for f in dataclasses.fields(cfg)
        if "captured" in f.metadata and getattr(cfg, f.metadata["captured"]["store"], "")
    }


def fingerprints(cfg: Any) -> dict[str, Any]:
    """Field name -> content fingerprint, for every declared input that is set (and not superseded)."""
    skip = superseded(cfg)
    out: dict[str, Any] = {}
    for name, kind in declared_inputs(cfg).items():
        value = getattr(cfg, name)
        if value and name not in skip:
            out[name] = _kind(kind)[0](str(value))
    return out


def canonical_config(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-able dict with every set input value in its canonical spelling."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    skip = superseded(cfg)  # the store's recorded values, verbatim: the same store, the same key anywhere
    for name, kind in declared_inputs(cfg).items():
        if out[name] and name not in skip:
            out[name] = _kind(kind)[1](str(out[name]))
    return out


# --- captured fields: resolved against the store -------------------------------------------
def store_run(path: str) -> dict[str, Any]:
    """A store's run.json (capture config and identity), read through ActivationStore's checks."""
    from workbench.store import ActivationStore

    return ActivationStore(path).run


def resolve_captured(
    cfg: Any, flag: Callable[[str], str] | None = None, explicit: Collection[str] = ()
) -> Any:
    """`cfg` with every captured field whose store is set replaced by the store's value.

    A field left at its default takes the store's value silently, unless it is in `explicit`
    (the CLI's typed options: `--model smollm2-135m` on a gemma store is a conflict too); a value
    that differs from the store's raises InputConflictError. `flag` spells a field name for the
    message (the CLI's `--n-tokens`); by default the field name itself."""
    flag = flag or (lambda name: "--" + name.replace("_", "-"))
    updates: dict[str, Any] = {}
    runs: dict[str, dict] = {}
    for f in dataclasses.fields(cfg):
        spec = f.metadata.get("captured")
        store_path = getattr(cfg, spec["store"], "") if spec else ""
        if not store_path:
            continue
        run = runs.setdefault(store_path, store_run(store_path))
        recorded, key = run.get("config", {}), spec["key"] or f.name
        if key not in recorded:
            continue  # the store does not record it: the field is simply not used
        theirs, ours = recorded[key], getattr(cfg, f.name)
        recorded_fp = run.get("identity", {}).get(key)
        if (f.name not in explicit and _is_default(f, ours)) or _same(
            ours, theirs, f.metadata.get("input"), recorded_fp
        ):
            updates[f.name] = _as_field_type(theirs, ours)
            continue
        origin = recorded.get("model", "?") + ("" if key == "model" else f", {key}={_show(theirs)}")
        raise InputConflictError(
            f"{flag(f.name)} {_show(ours)} conflicts with the store (captured from {origin}); "
            f"drop {flag(f.name)} or pick another store"
        )
    return dataclasses.replace(cfg, **updates) if updates else cfg


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


def _same(ours: Any, theirs: Any, kind: str | None, recorded_fingerprint: Any) -> bool:
    """Equal values, or (for an input kind) equal content: a data file given by another path."""
    if _norm(ours) == _norm(theirs):
        return True
    if not (kind and kind in _KINDS and ours):
        return False
    if isinstance(recorded_fingerprint, dict):  # a model identity records its weights hash
        recorded_fingerprint = recorded_fingerprint.get("weights_hash")
    try:
        fingerprint = _KINDS[kind][0]
        ours_fp = fingerprint(str(ours))
        return ours_fp == recorded_fingerprint or ours_fp == fingerprint(str(_norm(theirs)))
    except (OSError, ValueError, RuntimeError):
        return False


def _norm(value: Any) -> Any:
    """Comma lists and tuples compare as lists of stripped strings."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v).strip() for v in value)
    if isinstance(value, str) and "," in value:
        return ",".join(v.strip() for v in value.split(",") if v.strip())
    return value


def _as_field_type(theirs: Any, ours: Any) -> Any:
    if isinstance(ours, str) and isinstance(theirs, (list, tuple)):
        return ",".join(map(str, theirs))
    if isinstance(ours, tuple) and isinstance(theirs, list):
        return tuple(theirs)
    return theirs


def _show(value: Any) -> str:
    return _norm(value) if isinstance(value, (list, tuple)) else str(value)


def canonical_value(cfg: Any, kind: str) -> str | None:
    """The canonical value of the first set input of `kind` (e.g. the store's absolute path)."""
    for name, k in declared_inputs(cfg).items():
        if k == kind and getattr(cfg, name):
            return _kind(kind)[1](str(getattr(cfg, name)))
    return None


def origin_model(cfg: Any) -> str | None:
    """The model a run's numbers come from: the store's, when a store input is set."""
    for name, kind in declared_inputs(cfg).items():
        if kind == "store" and getattr(cfg, name):
            return store_run(getattr(cfg, name)).get("config", {}).get("model")
    for name, kind in declared_inputs(cfg).items():
        if kind == "model" and getattr(cfg, name):
            return getattr(cfg, name)
    return getattr(cfg, "model", None) or None


# --- built-in kinds ---------------------------------------------------------------------------
def canonical_path(value: str) -> str:
    """An existing local path as an absolute resolved path without trailing slash; else unchanged."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value.rstrip("/") if len(value) > 1 else value


def _canonical_list(value: str) -> str:
    return ",".join(canonical_path(p.strip()) for p in value.split(",") if p.strip())


def _store_fingerprint(value: str) -> Any:
    from workbench.store import ActivationStore

    return ActivationStore(value).fingerprint


def _model_fingerprint(value: str) -> Any:
    from workbench import models

    target, _ = models.resolve(value)
    return models.weights_hash(Path(target)) if Path(target).is_dir() else target


def _data_fingerprint(value: str) -> Any:
    from workbench import data

    return data.fingerprint(value)


def _dictionary_fingerprint(value: str) -> Any:
    return [_folder_fingerprint(p.strip()) for p in value.split(",") if p.strip()]


def _folder_fingerprint(path: str) -> str:
    """sha256 over a local folder's files (a dictionary: cfg.json + weights); the name itself otherwise."""
    from workbench import paths

    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        return path  # a pretrained release id: its name is its identity
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return paths.sha256_json([[p.name, paths.sha256_file(p)] for p in files])


def _model_canonical(value: str) -> str:
    return canonical_path(value) if Path(value).expanduser().is_dir() else value


def _data_canonical(value: str) -> str:
    return ",".join(p if p.startswith("hf:") else canonical_path(p) for p in _split(value))


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


register_kind("store", _store_fingerprint, canonical_path)
register_kind("model", _model_fingerprint, _model_canonical)
register_kind("data", _data_fingerprint, _data_canonical)
register_kind("dictionary", _dictionary_fingerprint, _canonical_list)

__all__ = [
    "InputConflictError",
    "canonical_config",
    "canonical_value",
    "captured",
    "declared_inputs",
    "fingerprints",
    "input_field",
    "origin_model",
    "register_kind",
    "resolve_captured",
    "superseded",
]
