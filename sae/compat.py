"""A dictionary's identity in its SAELens `cfg.json`, and the one guard that checks it.

What a dictionary was trained on (model, weight processing, input width) is written here
(`identity_metadata`, called by training) and read here (`processing_of`, `check_store`,
`check_model`): one name per fact, one place. The SAELens fields keep SAELens' meaning —
`model_name` is the model's Hugging Face id and `model_from_pretrained_kwargs` the
`HookedTransformer.from_pretrained_no_processing` flags that reproduce the activations — and
the workbench's own record lives under `metadata.workbench` (model key, processing, store name).
No local absolute path is written: a store is named relative to the stores folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# The flags TransformerLens' from_pretrained_no_processing needs to give each mode's activations:
# 'compat' is the Bridge's enable_compatibility_mode() defaults (fold norms, centre weights and
# unembedding, fold value biases); 'raw' is the HF numerics, every flag off.
_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
PROCESSING_KWARGS: dict[str, dict[str, bool]] = {
    "raw": dict.fromkeys(_FLAGS, False),
    "compat": dict.fromkeys(_FLAGS, True),
}
# Hugging Face ids of the workbench's GGUF model keys (the checkpoints they were quantised from).
HF_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}


class DictionaryMismatchError(ValueError):
    """A dictionary used on activations it was not trained for (width, model or weight processing)."""


def model_name(key: str) -> str:
    """The id SAELens' `model_name` should hold for a workbench model key: the HF id, never a local path.

    A GGUF key maps to the checkpoint's Hub id; a local HF folder to its config's `_name_or_path`
    when that is a Hub id, else to the folder's name; anything else is already a Hub id."""
    if key in HF_IDS:
        return HF_IDS[key]
    folder = Path(key).expanduser()
    if folder.is_dir():
        try:
            named = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
        except (OSError, ValueError):
            named = ""
        is_path = not named or named.startswith((".", "/", "~")) or Path(named).expanduser().exists()
        return folder.name if is_path else named
    return key


def _store_name(root: Path) -> str:
    """The store relative to the stores folder (how `--store` names it); only the folder name otherwise."""
    from workbench import paths

    root = Path(root).resolve()
    stores = (paths.home() / "stores").resolve()
    return str(root.relative_to(stores)) if root.is_relative_to(stores) else root.name


def identity_metadata(store_config: dict[str, Any], store_root: str | Path) -> dict[str, Any]:
    """SAELens metadata fields (and `workbench` record) for a dictionary trained on this store."""
    key, processing = store_config.get("model", ""), store_config.get("processing", "raw")
    data = str(store_config.get("data") or "")
    return {
        "model_name": model_name(key),
        # SAELens' cfg.json vocabulary for readers such as SAEDashboard; the workbench itself only
        # boots TransformerBridge and never imports HookedTransformer
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": dict(PROCESSING_KWARGS[processing]),
        "context_size": store_config.get("ctx_len"),
        "prepend_bos": store_config.get("bos") == "prepend",
        # a Hub dataset keeps its id; a local file only its name (no absolute paths in cfg.json)
        "dataset_path": data if data.startswith("hf:") or not data else Path(data).name,
        "workbench": {
            "model": model_name(key) if Path(key).expanduser().is_dir() else key,
            "processing": processing,
            "bos": store_config.get("bos"),
            "store": _store_name(Path(store_root)),
        },
    }


def _meta(sae) -> Any:
    return sae.cfg.metadata


def processing_in(metadata) -> str | None:
    """The weight processing a dictionary's metadata (dict or SAEMetadata) records: our record,
    else SAELens' `fold_ln` flag; None = unknown. The one reader of this fact."""
    record = metadata.get("workbench") or {}
    if record.get("processing"):
        return record["processing"]
    flags = metadata.get("model_from_pretrained_kwargs") or {}
    return ("compat" if flags["fold_ln"] else "raw") if "fold_ln" in flags else None


def processing_of(sae) -> str | None:
    """The weight processing a dictionary was trained on (`processing_in` of its metadata)."""
    return processing_in(_meta(sae))


def _official(name: str) -> str:
    """TransformerLens' official name for an alias (gpt2-small -> gpt2); the name itself if unknown."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return get_official_model_name(name)
    except Exception:  # noqa: BLE001 - not a TransformerLens model: compare as written
        return name


def _same_model(sae, key: str) -> tuple[bool, str]:
    """(the dictionary's model is `key`'s, how the dictionary names its model); unknown counts as same."""
    meta = _meta(sae)
    record = meta.get("workbench") or {}
    theirs = record.get("model") or meta.get("model_name")
    if not theirs or not key:
        return True, theirs or "?"
    ours = {key, model_name(key)}
    if theirs in ours or meta.get("model_name") in ours:
        return True, theirs
    return _official(str(meta.get("model_name") or theirs)) in {_official(n) for n in ours}, theirs


def _sites(sae) -> tuple[str, str]:
    meta = _meta(sae)
    return meta.hook_name or "", meta.get("hook_name_out") or meta.hook_name or ""


def _check(sae, name: str, where: str, key: str, processing: str, widths: dict[str, int], fix: str) -> None:
    same, theirs = _same_model(sae, key)
    if not same:
        raise DictionaryMismatchError(
            f"dictionary {name} was trained on model '{theirs}', but {where} is of model '{key}'"
        )
    trained = processing_of(sae)
    if trained and processing and trained != processing:
        raise DictionaryMismatchError(
            f"dictionary {name} was trained on '{trained}' activations (weight processing), but {where} "
            f"holds '{processing}' ones; {fix} {trained}"
        )
    site_in, site_out = _sites(sae)
    for site, width, role in ((site_in, sae.cfg.d_in, "reads"), (site_out, _d_out(sae), "writes")):
        if site in widths and width is not None and widths[site] != width:
            raise DictionaryMismatchError(
                f"dictionary {name} {role} {site} with width {width}, but {where} has width "
                f"{widths[site]} there; it was trained on another model or site"
            )


def _d_out(sae) -> int | None:
    return getattr(sae.cfg, "d_out", None) or sae.cfg.d_in


def _held(site: str, store) -> str | None:
    """The store's name for `site` (aliases accepted when `sites.held_name` is there), else None."""
    from workbench import sites

    if hasattr(sites, "held_name"):
        return sites.held_name(site, store.sites, store.run.get("aliases"))  # run.json, not its config
    return site if site in store.sites else None


def check_store(sae, store, name: str) -> None:
    """Refuse (one line) a dictionary whose model, processing or site widths differ from the store's."""
    held = {s: _held(s, store) for s in _sites(sae)}
    widths = {s: math.prod(store.shape(h)) for s, h in held.items() if h}
    cfg = store.config
    fix = "capture a store with --processing"
    _check(sae, name, f"store {store.root}", cfg.get("model", ""), cfg.get("processing", "raw"), widths, fix)


def site_widths(model, sites: list[str]) -> dict[str, int]:
    """Width of each site (features per token) from one forward pass over one token."""
    import torch

    widths: dict[str, int] = {}

    def keeper(site: str):  # keyed by the name asked for: the Bridge's hook.name may be an alias
        def keep(x, hook):
            widths[site] = math.prod(x.shape[2:])
            return x

        return keep

    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device),
            fwd_hooks=[(s, keeper(s)) for s in dict.fromkeys(sites) if s],
            return_type=None,
        )
    return widths


def check_model(sae, model, name: str) -> None:
    """Refuse (one line) a dictionary whose model, processing or site widths differ from a loaded model's."""
    info = getattr(model, "workbench", None)
    key, processing = (info.key, info.processing) if info is not None else ("", "")
    fix = "load the model with processing"
    _check(sae, name, f"model '{key}' ({processing})", key, processing, {}, fix)  # before the forward
    hooks = model.hook_dict
    for site in _sites(sae):
        if site not in hooks:
            raise DictionaryMismatchError(
                f"dictionary {name} reads {site}, which is no hook of model '{key}'; it was trained on another model"
            )
    _check(sae, name, f"model '{key}'", key, processing, site_widths(model, list(_sites(sae))), fix)
