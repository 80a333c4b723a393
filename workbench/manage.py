"""Housekeeping behind the CLI and Home: presets, what a result was computed from, deleting
results and stores. Nothing here imports torch unless a store is touched."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path
from string import Template
from typing import Any

from workbench import inputs, paths

SITE_FIELDS = ("site", "sites", "target_site")  # shown in listings (display only, not identity)


# --- presets ----------------------------------------------------------------------------------
def shared_dir() -> Path:
    """`$WORKBENCH_SHARED`, else the `shared/` folder beside the checkout (research data)."""
    env = os.environ.get("WORKBENCH_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def load_preset(path: str | Path, name: str) -> dict[str, Any]:
    """A preset's option values for analysis `name`, with `$WORKBENCH_HOME` and `$WORKBENCH_SHARED`
    expanded in strings, so presets name no machine-specific path."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read preset {path}: {err}") from err
    if values.get("analysis", name) != name:
        raise ValueError(f"preset {path} is for '{values['analysis']}', not '{name}'")
    where = {"WORKBENCH_HOME": str(paths.home()), "WORKBENCH_SHARED": str(shared_dir())}
    return {
        k: Template(v).safe_substitute(where) if isinstance(v, str) else v
        for k, v in values.get("config", {}).items()
    }


def superseded_fields(cfg_cls: type, values: dict[str, Any]) -> set[str]:
    """Captured fields of `cfg_cls` whose store is set in `values`: a store replaces them."""
    return {
        f.name
        for f in dataclasses.fields(cfg_cls)
        if "captured" in f.metadata and values.get(f.metadata["captured"]["store"])
    }


# --- what a result was computed from ------------------------------------------------------------
def computed_from(cfg: Any) -> dict[str, Any]:
    """Store (canonical path), model, site(s) and the options that differ from the defaults, for
    `meta.json`: listings show it without importing the analysis."""
    canon = inputs.canonical_config(cfg)
    defaults = inputs.canonical_config(type(cfg)())
    # store and model have their own columns; other inputs (task, dictionary, data) are options
    shown = {k for k, kind in inputs.declared_inputs(cfg).items() if kind in ("store", "model")}
    skip = shown | inputs.superseded(cfg) | set(SITE_FIELDS)
    return {
        "store": inputs.canonical_value(cfg, "store"),
        "model": inputs.origin_model(cfg),
        "site": ",".join(str(canon[k]) for k in SITE_FIELDS if canon.get(k)) or None,
        "options": {k: v for k, v in canon.items() if k not in skip and v != defaults.get(k)},
    }


def describe(row: dict[str, Any]) -> dict[str, Any]:
    """A results-index row as `workbench results` and Home show it: key, analysis, model, from
    (store id or path; "capture" when the run captured its own), site, options, duration."""
    meta = _read_json(Path(row.get("path") or "") / "meta.json")
    source = meta.get("computed_from")
    if source is None:  # an entry from before computed_from was recorded
        config = row.get("config") or {}
        source = {"store": config.get("store") or None, "site": config.get("site"), "options": {}}
    store = source.get("store")
    return {
        "key": row["key"][:16],
        "analysis": row.get("analysis"),
        "model": source.get("model") or row.get("model"),
        "from": _store_label(store) if store else "capture",
        "site": source.get("site") or "",
        "options": " ".join(f"{k}={v}" for k, v in sorted(source.get("options", {}).items())),
        "duration": row.get("duration"),
    }


def _store_label(store: str) -> str:
    """The id `workbench stores` lists for stores under $WORKBENCH_HOME/stores, else the path."""
    path = Path(store)
    return path.name if path.parent == paths.stores_dir().resolve() else store


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- deleting ---------------------------------------------------------------------------------
def find_result(prefix: str, results) -> dict[str, Any]:
    """Key and analysis of the one cached result whose key starts with `prefix` (the cache's
    `resolve`: works whatever state the index is in)."""
    key = results.resolve(prefix)
    return {"key": key, "analysis": _read_json(results.entry_dir(key) / "meta.json").get("analysis", "?")}


def delete_result(prefix: str, results) -> dict[str, Any]:
    """Remove one cached result (folder and index row); returns its index row."""
    row = find_result(prefix, results)
    results.evict(row["key"])
    return row


_STORE_FILES = ("run.json", "manifest.parquet", "tokens.parquet", ".lock")
_STORE_FOLDERS = ("acts", "tokens")


def resolve_existing_store(name: str) -> Path:
    """A store folder by path or id; StoreError for anything that is not a store."""
    from workbench import store_state
    from workbench.store import StoreError, resolve_store

    root = resolve_store(name)
    if not root.is_dir() or not store_state.is_store(root):
        raise StoreError(
            f"{name} is not an activation store (no run.json or manifest.parquet); nothing deleted"
        )
    return root


def delete_store(name: str) -> tuple[Path, list[str]]:
    """Delete a store's own files (never others' files in its folder) and the folder if then empty.

    Returns (folder, names left behind). Refuses a store that a capture is writing."""
    from workbench import store_state
    from workbench.store import StoreError

    root = resolve_existing_store(name)
    fd = os.open(root / store_state.LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the capture's writer lock
        except BlockingIOError:
            raise StoreError(f"{root} is being written by a running capture; stop it first") from None
        for folder in _STORE_FOLDERS:
            shutil.rmtree(root / folder, ignore_errors=True)
        for path in root.iterdir():
            if path.name in _STORE_FILES or store_state._LEFTOVER.fullmatch(path.name):
                path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    left = sorted(p.name for p in root.iterdir())
    if not left:
        root.rmdir()
    return root, left
