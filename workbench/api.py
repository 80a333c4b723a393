"""The one surface: the CLI, the Streamlit app and Jupyter all call these functions.

    import workbench as wb
    store = wb.capture(model="smollm2-135m", sites=["blocks.*.mlp.hook_post"], n_tokens=4096)
    result = wb.run("activation-stats", store=str(store.root))
    result.figures()["mean by layer"].show()

`run` is a cache hit whenever the same analysis, version, config, model weights and input data
were computed before, by any process.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import time
from collections.abc import Collection
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import analysis, inputs, manage, models, paths
from workbench.capture_config import CaptureConfig

# tokens coloured by values, one renderer for the app, the prompt lens and Jupyter
from workbench.highlight import colour as token_colour  # noqa: F401
from workbench.highlight import scale as token_scale  # noqa: F401
from workbench.highlight import show_tokens, token_spans  # noqa: F401

# torch, TransformerLens and the store are imported where used: `workbench --help`, `list`,
# `models` must not pay for them.
if TYPE_CHECKING:
    from workbench.cache import Entry, ResultsCache
    from workbench.context import Progress
    from workbench.store import ActivationStore

log = logging.getLogger(__name__)

list_models = models.list_models
ENGINES = ("local", "ray")  # where captures, sweeps and map-reduce analyses run
__all__ = [
    "list_models",
    "open_store",
    "list_stores",
    "load_model",
    "load_mask",
    "masked",
    "capture",
    "run",
    "sweep",
    "load",
    "cached",
    "list_analyses",
]


def open_store(root: str | Path) -> ActivationStore:
    """An activation store by folder (read side: rows by memory map, shuffled batches)."""
    from workbench.store import ActivationStore

    return ActivationStore(root)


def list_stores(root: Path | None = None) -> list[dict]:
    """Stores under $WORKBENCH_HOME/stores with provenance and size."""
    from workbench.store_index import list_stores as _list

    return _list(root)


def load_model(key: str = models.DEFAULT_MODEL, processing: str = "raw"):
    """A TransformerBridge for `key`, pooled so a second call returns the same object."""
    from workbench.context import POOL

    return POOL.get(key, processing)


def capture(
    progress: bool | Progress = True,
    out: str | None = None,
    engine: str = "local",
    address: str | None = None,
    workers: int = 2,
    **cfg: Any,
) -> ActivationStore:
    """Capture activations (see CaptureConfig for the options); resumes a partial run of the same identity.

    Every option and the text source are checked before the model loads; a capture that gets
    fewer tokens than asked (the text ran out) logs one warning line with both numbers.
    `engine="ray"` splits the shards over `workers` Ray actors, on the cluster at `address` (or
    one started on this machine); the store is the same (workbench.distributed.ray_capture)."""
    from workbench.capture import capture as _capture

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got '{engine}'")
    config = CaptureConfig(**cfg)
    config.preflight()
    if out is not None:  # a folder that is not ours is refused before the model loads
        from workbench.store_state import check_out_folder

        check_out_folder(Path(out))
    if engine == "ray":
        from workbench.distributed.ray_capture import capture_on_ray

        store = capture_on_ray(config, out=out, address=address, workers=workers, progress=progress)
        config.warn_if_short(store.n_rows)
        return store
    model = load_model(config.model, config.processing)
    config.check_model(model)  # a GGUF key has no config.json before its first load
    store = _capture(config, model=model, out=out, progress=progress)
    config.warn_if_short(store.n_rows)
    return store


def list_analyses() -> list[dict[str, Any]]:
    """Name, version and summary of every registered analysis (without importing them when unchanged)."""
    return analysis.listing()


def cache(root: str | Path | None = None) -> ResultsCache:
    from workbench.cache import ResultsCache

    return ResultsCache(Path(root) if root else None)


def make_config(name: str, cfg: Any = None, **overrides: Any) -> Any:
    spec = analysis.get(name)
    if cfg is None:
        return spec.make_config(**overrides)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def input_fingerprints(cfg: Any) -> dict[str, Any]:
    """Content identity of every declared input the config sets (see workbench.inputs)."""
    return inputs.fingerprints(cfg)


def key_for(name: str, cfg: Any) -> str:
    """Cache key from declared inputs only: canonical config + input fingerprints (see workbench.inputs)."""
    spec = analysis.get(name)
    cfg = inputs.resolve_captured(cfg)
    return paths.sha256_json(
        {
            "analysis": name,
            "version": spec.version,
            "config": inputs.canonical_config(cfg),
            "inputs": inputs.fingerprints(cfg),
        }
    )


def run(
    name: str,
    cfg: Any = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    results: ResultsCache | None = None,
    explicit: Collection[str] = (),
    engine: str = "local",
    address: str | None = None,
    **overrides: Any,
) -> analysis.Result:
    """Run an analysis, or return its cached result. A corrupt cache entry is recomputed.

    With a store, the capture options come from it; one that differs is an error, and so is one
    named in `explicit` (options the user typed) even when it equals the default.
    `engine="ray"` runs the analysis's per-shard maps (`Context.map`) as Ray tasks on the
    cluster at `address`; the result, and so its cache key, is the local one."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got '{engine}'")
    spec = analysis.get(name)
    cfg = make_config(name, cfg, **overrides)
    cfg = inputs.resolve_captured(cfg, explicit=explicit)  # a store supersedes capture options
    if hasattr(cfg, "capture_config") and not inputs.canonical_value(cfg, "store"):
        cfg.capture_config().preflight()  # bad text or ctx_len fails before the model loads
    results = results or cache()
    key = key_for(name, cfg)
    if not force:
        hit = _cached_result(results, spec, key)
        if hit is not None:
            return hit
    start = time.time()
    from workbench.context import Context

    ctx = Context(
        progress=progress, work_dir=paths.home() / "work" / key[:16], engine=engine, address=address
    )
    result = spec.fn(cfg, ctx)
    if engine == "ray" and not ctx.mapped:
        log.warning("%s has no per-shard map: it ran in this process, not on Ray", name)
    payload, arrays = result.to_payload()
    meta = _provenance(spec, cfg, time.time() - start)
    results.put(key, config=inputs.canonical_config(cfg), meta=meta, result=payload, arrays=arrays)
    result.cache_key = key
    return result


def sweep(
    name: str,
    configs: list[dict],
    engine: str = "local",
    address: str | None = None,
    on_done: Any = None,
) -> list:
    """Run `name` once per config (e.g. train-sae over several k, widths, layers or archs), each an
    ordinary cached run: here one after another, or with engine="ray" as Ray tasks on the cluster at
    `address`. Every config is checked first; `on_done(run)` is called as each finishes (its result
    is then in the cache). Returns `SweepRun(overrides, key)` in config order."""
    from workbench.distributed.ray_sweep import SweepRun, check_configs, sweep_on_ray

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got '{engine}'")
    if engine == "ray":
        return sweep_on_ray(name, configs, address=address, on_done=on_done)
    check_configs(name, configs)
    runs = []
    for overrides in configs:
        runs.append(SweepRun(dict(overrides), run(name, **overrides).cache_key))
        if on_done is not None:
            on_done(runs[-1])
    return runs


def _cached_result(results: ResultsCache, spec: analysis.AnalysisSpec, key: str) -> analysis.Result | None:
    from workbench.cache import CorruptEntryError

    try:
        entry = results.get(key)
    except CorruptEntryError as err:
        log.warning("%s; recomputing", err)
        results.evict(key)
        return None
    if entry is None:
        return None
    return _result_of(spec, entry)


def _result_of(spec: analysis.AnalysisSpec, entry: Entry) -> analysis.Result:
    result = spec.result_cls.from_payload(entry.result, entry.arrays())
    result.cache_key = entry.key
    return result


def load(key: str, results: ResultsCache | None = None) -> analysis.Result:
    """A cached result by key (as listed by `cached()`)."""
    results = results or cache()
    entry = results.get(key)
    if entry is None:
        raise KeyError(f"no cached result {key[:12]}")
    return _result_of(analysis.get(entry.meta["analysis"]), entry)


def load_mask(path: str | Path, model: str | None = None):
    """A saved weight mask (`workbench.masks.MaskSet`), checked against the pooled model it was
    trained on (`model`: the key recorded in the file unless given)."""
    from workbench import masks

    key = model or masks.read_mask(path).meta["model_key"]
    return masks.load_mask(path, load_model(key))


def masked(path: str | Path, model: str | None = None):
    """`with wb.masked("mask.safetensors") as model:` the pooled model with the saved mask applied
    (raw weights times the mask) inside the block only; its own weights are never changed."""
    from workbench import masks

    key = model or masks.read_mask(path).meta["model_key"]
    return masks.apply_mask(load_model(key), load_mask(path, key))


load_preset = manage.load_preset


def results_table(
    name: str | None = None, text: str | None = None, results: ResultsCache | None = None
) -> list[dict]:
    """Cached results as listings show them: key, analysis, model, from (store id or "capture"),
    site, options that differ from the defaults, duration; newest first."""
    return [manage.describe(r) for r in cached(name, text, results)]


def delete_result(prefix: str, results: ResultsCache | None = None) -> dict:
    """Delete the one cached result whose key starts with `prefix`; returns its index row."""
    return manage.delete_result(prefix, results or cache())


def delete_store(name: str) -> tuple[Path, list[str]]:
    """Delete an activation store (path or id): its own files, and its folder once empty."""
    return manage.delete_store(name)


def cached(
    name: str | None = None, text: str | None = None, results: ResultsCache | None = None
) -> list[dict]:
    """Index rows of cached results, newest first."""
    return (results or cache()).list(analysis=name, text=text)


def _provenance(spec: analysis.AnalysisSpec, cfg: Any, duration: float) -> dict[str, Any]:
    return {
        "analysis": spec.name,
        "version": spec.version,
        "model": inputs.origin_model(cfg),
        "store": inputs.canonical_value(cfg, "store"),
        "computed_from": manage.computed_from(cfg),
        "created": time.time(),
        "duration_s": round(duration, 3),
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "packages": {
            p: _version(p) for p in ("torch", "transformers", "transformer-lens", "sae-lens", "mi-workbench")
        },
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:  # noqa: BLE001
        return "not installed"


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Prompt lens and analysis forms for the app (workbench/lens.py, imported on first use).
_LENS = (
    "LensError",
    "config_fields",
    "dictionary_info",
    "list_dictionaries",
    "load_dictionary",
    "parse_form",
    "prompt_lens",
)


# One unit on the user's own text, for the feature and neuron pages (workbench/units.py).
_UNITS = ("unit_activations", "dictionary_store")


# Steering vectors calibrated to a target KL, for the steering playground (workbench/steering.py).
_STEERING = ("steer_text", "KL_TARGETS", "SteeringError")


def __getattr__(name: str) -> Any:
    if name in _STEERING:
        from workbench import steering

        return getattr(steering, name)
    if name in _LENS:
        from workbench import lens

        return getattr(lens, name)
    if name in _UNITS:
        from workbench import units

        return getattr(units, name)
    raise AttributeError(f"module 'workbench.api' has no attribute '{name}'")
