"""Save and load dictionaries in SAELens' format (`cfg.json` + `sae_weights.safetensors`).

    sae = load_dictionary("~/.cache/workbench/dictionaries/abc123")     # ours or any SAELens folder
    sae = load_dictionary("gpt2-small-res-jb/blocks.8.hook_resid_pre")  # SAELens release/id (online)

Folders under `$WORKBENCH_HOME/dictionaries/` can be named by their folder name alone.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from sae_lens import SAE, TrainingSAE

from workbench import paths
from workbench import sae as _registers  # noqa: F401  (registers top_afa and the transcoder training class)
from workbench.sae.compat import processing_in

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


class DictionaryError(ValueError):
    """A dictionary that cannot be found or loaded; the message says what to do."""


def dictionaries_dir() -> Path:
    return paths.home() / "dictionaries"


def list_dictionaries() -> list[dict[str, Any]]:
    """One row per saved dictionary under `$WORKBENCH_HOME/dictionaries`."""
    rows = []
    for cfg_path in sorted(dictionaries_dir().glob(f"*/{CFG_FILE}")):
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        meta = cfg.get("metadata", {})
        rows.append(
            {
                "path": str(cfg_path.parent),
                "architecture": meta.get("training_architecture", cfg.get("architecture")),
                "d_in": cfg.get("d_in"),
                "d_sae": cfg.get("d_sae"),
                "model": (meta.get("workbench") or {}).get("model") or meta.get("model_name"),
                "processing": processing_in(meta),
                "hook_name": meta.get("hook_name"),
                "hook_name_out": meta.get("hook_name_out"),
            }
        )
    return rows


def save_dictionary(sae: SAE, path: str | Path) -> Path:
    """Write the inference form of `sae` (training dictionaries are converted, e.g. BatchTopK -> JumpReLU)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(tmp)
    else:
        sae.save_model(tmp)
    if path.exists():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    os.replace(tmp, path)
    return path


def _local_folder(spec: str) -> Path | None:
    for candidate in (Path(spec).expanduser(), dictionaries_dir() / spec):
        if (candidate / CFG_FILE).exists():
            return candidate
    return None


def load_dictionary(spec: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE:
    """A dictionary from a folder (ours or SAELens'), a name under dictionaries/, or 'release/sae_id'."""
    folder = _local_folder(str(spec))
    if folder is not None:
        return _load_folder(folder, device, dtype)
    if Path(str(spec)).expanduser().exists():
        raise DictionaryError(f"{spec} exists but holds no {CFG_FILE}; it is not a SAELens dictionary folder")
    return _load_pretrained(str(spec), device, dtype)


def _load_folder(folder: Path, device: str, dtype: str | None) -> SAE:
    try:
        arch = json.loads((folder / CFG_FILE).read_text())["architecture"]
    except (OSError, ValueError, KeyError) as err:
        raise DictionaryError(f"{folder / CFG_FILE} is unreadable or has no 'architecture' ({err})") from err
    if not (folder / WEIGHTS_FILE).exists():
        raise DictionaryError(f"{folder} has a {CFG_FILE} but no {WEIGHTS_FILE}; the save was interrupted")
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    with warnings.catch_warnings():
        # SAELens advises loading the model with cfg.model_from_pretrained_kwargs; here `sae.compat`
        # checks the processing against the store or model instead
        warnings.filterwarnings(
            "ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs", category=UserWarning
        )
        if arch in SAE_CLASS_REGISTRY:
            return SAE.load_from_disk(folder, device=device, dtype=dtype)
        if arch in SAE_TRAINING_CLASS_REGISTRY:  # a training checkpoint (e.g. batchtopk before conversion)
            return TrainingSAE.load_from_disk(folder, device=device, dtype=dtype)
    raise DictionaryError(f"{folder}: unknown architecture '{arch}'; known: {sorted(SAE_CLASS_REGISTRY)}")


def _split_release(spec: str) -> tuple[str, str]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for sep in (":", "/"):
        parts = spec.split(sep)
        for i in range(1, len(parts)):
            release, sae_id = sep.join(parts[:i]), sep.join(parts[i:])
            if release in directory:
                return release, sae_id
    raise DictionaryError(
        f"'{spec}' is neither a dictionary folder nor a known SAELens release/id "
        f"(e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre); saved dictionaries: "
        f"{', '.join(Path(r['path']).name for r in list_dictionaries()) or 'none'}"
    )


def _load_pretrained(spec: str, device: str, dtype: str | None) -> SAE:
    release, sae_id = _split_release(spec)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DictionaryError(
            f"SAELens release '{release}' id '{sae_id}' must be downloaded from the Hugging Face Hub, "
            "but HF_HUB_OFFLINE=1; go online once (it is cached afterwards) or pass a local folder"
        )
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    except OSError as err:  # network or cache failures from huggingface_hub
        raise DictionaryError(
            f"could not fetch SAELens release '{release}' id '{sae_id}' from the Hugging Face Hub ({err}); "
            "check the connection, or pass a local dictionary folder"
        ) from err
