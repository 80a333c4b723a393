"""The analysis protocol: frozen config dataclass + Result + `@register(name, version)` run function.

    @register("activation-stats", version=1)
    def run(cfg: StatsConfig, ctx: Context) -> StatsResult: ...

A Result is a dataclass whose tensor fields (or dicts of tensors) are stored as safetensors and
whose other fields are JSON; `figures()` builds plotly figures from its fields without I/O and
`summary()` gives table rows. Analyses live in the top-level `analyses` package (or any package
exposing the `workbench.analyses` entry point) and are discovered on first use.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import pkgutil
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import checks

if TYPE_CHECKING:  # imported where tensors are (de)serialised: listing analyses stays light
    import torch

log = logging.getLogger(__name__)


@dataclass
class Result:
    """Base of every analysis result."""

    def figures(self) -> dict[str, Any]:
        """Title -> plotly Figure. Pure: no I/O, no model."""
        return {}

    def summary(self) -> list[dict[str, Any]]:
        """Rows of the result's headline table."""
        return []

    # --- (de)serialisation for the results cache ---------------------------------------
    def to_payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        import torch

        plain: dict[str, Any] = {}
        arrays: dict[str, torch.Tensor] = {}
        tensor_fields: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                arrays[f.name] = value
                tensor_fields[f.name] = "tensor"
            elif (
                isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())
            ):
                for k, v in value.items():
                    arrays[f"{f.name}/{k}"] = v
                tensor_fields[f.name] = list(value)
            else:
                plain[f.name] = value
        return {"fields": plain, "tensor_fields": tensor_fields}, arrays

    @classmethod
    def from_payload(cls, payload: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Result:
        kwargs = dict(payload["fields"])
        for name, kind in payload["tensor_fields"].items():
            kwargs[name] = arrays[name] if kind == "tensor" else {k: arrays[f"{name}/{k}"] for k in kind}
        return cls(**kwargs)


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    version: int
    config_cls: type
    result_cls: type[Result]
    fn: Callable
    doc: str

    def make_config(self, **overrides) -> Any:
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"{self.name} has no option(s) {sorted(unknown)}; options: {sorted(names)}")
        cfg = self.config_cls(**overrides)
        checks.check_config(cfg)  # choices (Literal fields) and no negative numbers
        return cfg


_REGISTRY: dict[str, AnalysisSpec] = {}
_discovered = False


def register(name: str, version: int = 1) -> Callable:
    """Register `fn(cfg, ctx) -> Result`; config and result classes come from its annotations."""

    def deco(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
        spec = AnalysisSpec(
            name=name,
            version=version,
            config_cls=hints[params[0]],
            result_cls=hints["return"],
            fn=fn,
            doc=inspect.getdoc(fn) or inspect.getdoc(inspect.getmodule(fn)) or "",
        )
        known = _REGISTRY.get(name)
        if known is not None and known.fn.__module__ != fn.__module__:
            raise ValueError(
                f"analysis '{name}' is registered twice: by {known.fn.__module__} and by {fn.__module__}"
            )
        _REGISTRY[name] = spec
        return fn

    return deco


FAILED: dict[str, str] = {}
"""Module -> error, for analysis modules that failed to import (the others still load)."""


def discover() -> None:
    """Import every module of the `analyses` package and every `workbench.analyses` entry point.

    Each module is imported on its own: one that fails is reported (a warning naming it and the
    error, kept in FAILED) and the rest still load. A name registered twice is an error."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    try:
        package = importlib.import_module("workbench.analyses")
    except ModuleNotFoundError:
        log.warning("no 'analyses' package found")
        package = None
    modules = (
        [f"workbench.analyses.{m.name}" for m in pkgutil.iter_modules(package.__path__)] if package else []
    )
    for name in modules:
        _load(name, lambda name=name: importlib.import_module(name))
    for ep in entry_points(group="workbench.analyses"):
        _load(ep.value, ep.load)


def _load(name: str, load: Callable[[], Any]) -> None:
    try:
        load()
    except Exception as err:  # noqa: BLE001 - any import error: report it, keep the other analyses
        if isinstance(err, ValueError) and "registered twice" in str(err):
            raise
        FAILED[name] = f"{type(err).__name__}: {err}"
        log.warning("analysis module %s failed to import and is skipped: %s", name, FAILED[name])


def listing() -> list[dict[str, Any]]:
    """Name, version and first doc line of every analysis, newest import-free: from
    `$WORKBENCH_HOME/analyses.json` while the analysis files are unchanged (by size and mtime),
    else by importing them (and then refreshing that file, when every module imported)."""
    from workbench import paths

    if _discovered or _REGISTRY:  # already imported here (a notebook may have registered its own)
        return _rows(all_specs())
    index = paths.home() / "analyses.json"
    stamp = _stamp()
    try:
        saved = json.loads(index.read_text())
        if saved.get("stamp") == stamp:
            return [{k: r[k] for k in ("name", "version", "doc")} for r in saved["rows"]]
    except (OSError, ValueError, KeyError):
        pass
    rows = _rows(all_specs())
    if not FAILED:
        try:
            paths.atomic_write_json(index, {"stamp": stamp, "rows": rows})
        except OSError:
            pass  # read-only home: import next time
    return rows


def _rows(specs: list[AnalysisSpec]) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "version": s.version, "doc": s.doc.splitlines()[0] if s.doc else ""} for s in specs
    ]


def _stamp() -> list:
    """Size and mtime of every analysis source file, and the entry points: what the listing depends on."""
    spec = importlib.util.find_spec("workbench.analyses")
    roots = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(p for root in roots for p in Path(root).rglob("*.py"))
    eps = sorted(f"{ep.name}={ep.value}" for ep in entry_points(group="workbench.analyses"))
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files] + eps


def get(name: str) -> AnalysisSpec:
    discover()
    if name not in _REGISTRY:
        raise KeyError(f"unknown analysis '{name}'; available: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def all_specs() -> list[AnalysisSpec]:
    discover()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (sparsify/simple-parsing style)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[stmt.target.id] = str(nxt.value.value).strip()
    return docs


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
