"""Weight masks on the pooled model: which entries of every attention and MLP matrix are kept.

    mask = load_mask("bigram.safetensors", model)        # validated against this model
    with apply_mask(model, mask):                        # w * m inside the block only
        logits = model(tokens)

* Masked weights are every 2-D weight inside a transformer block (attention and MLP matrices, in
  Hugging Face names such as `model.layers.0.mlp.up_proj.weight`); biases, norms, the embedding
  and the unembedding are always kept (Chang & Bergen 2025, arXiv 2504.15471, §3).
* Masks act on RAW weights: compat mode folds norms into and centres the matrices, which would
  mix masked and kept entries, so a compat-mode model is refused.
* The pooled model's parameters are never written: inside `swapped` each masked module's weight
  entry is replaced by a new tensor and the original Parameter object is put back on exit (also
  on error). The block holds the model lock (`workbench.interventions.model_lock`), so a reader
  that takes the lock (the prompt lens) never sees a masked weight.
* Files are safetensors: one bool tensor per HF parameter name, with metadata naming the model
  key, its weights hash, the processing mode and the training settings (λ …).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from workbench.interventions import model_lock

FORMAT = "workbench-mask/1"
_WRAPPER = "._original_component"  # the Bridge wraps each HF module; HF names drop this part
_BLOCK = re.compile(r"\.(layers|h)\.\d+\.")  # Llama/NeoX `layers.N`, GPT-2 `h.N`


class MaskError(ValueError):
    """A mask that does not fit the model (another model, shape, name, processing mode, λ)."""


@dataclass
class MaskSet:
    """HF parameter name -> bool tensor of that weight's shape (True = kept)."""

    masks: dict[str, Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def kept_fraction(self) -> float:
        """Kept entries / maskable entries (attention and MLP matrices only)."""
        return self.kept() / max(self.total(), 1)

    def complement(self) -> MaskSet:
        """The full model minus this subnetwork."""
        return MaskSet({k: ~m for k, m in self.masks.items()}, dict(self.meta))

    def random_like(self, seed: int = 0) -> MaskSet:
        """A random mask keeping the same number of entries in every matrix (uniform positions)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, m in self.masks.items():
            flat = torch.zeros(m.numel(), dtype=torch.bool)
            flat[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
            out[name] = flat.view(m.shape)
        return MaskSet(out, {"random_like": "1", "seed": str(seed)})

    @classmethod
    def full(cls, model) -> MaskSet:
        return cls({n: torch.ones(p.shape, dtype=torch.bool) for n, p in maskable(model).items()})


def hf_name(bridge_name: str) -> str:
    """`model.layers.0._original_component.mlp…weight` -> `model.layers.0.mlp…weight`."""
    return bridge_name.replace(_WRAPPER, "")


def check_raw(model) -> None:
    info = getattr(model, "workbench", None)
    if info is not None and info.processing != "raw":
        raise MaskError(
            "weight masks need the raw weights: this model was loaded with processing="
            f"'{info.processing}' (folded norms and centred weights would mix masked and kept "
            "entries); load it with processing='raw'"
        )


def _targets(model) -> dict[str, tuple[torch.nn.Module, str, Tensor]]:
    """HF name -> (module, attribute, Parameter) for every maskable weight of the model."""
    out = {}
    for name, param in model.named_parameters():
        hf = hf_name(name)
        if param.ndim == 2 and hf.endswith(".weight") and _BLOCK.search(hf):
            owner, attr = name.rsplit(".", 1)
            out[hf] = (model.get_submodule(owner), attr, param)
    return out


def maskable(model) -> dict[str, Tensor]:
    """HF name -> the weight Parameter, for every attention and MLP matrix (raw mode only)."""
    check_raw(model)
    return {k: p for k, (_, _, p) in _targets(model).items()}


@contextmanager
def swapped(model, weights: dict[str, Tensor]) -> Iterator[None]:
    """Inside the block the model computes with `weights` (HF name -> tensor) in place of its own.

    The Parameters themselves are untouched: each module's entry is re-pointed at the new tensor
    (which may carry autograd history, for training) and pointed back at the Parameter on exit."""
    targets = _targets(model)
    unknown = sorted(set(weights) - set(targets))
    if unknown:
        raise MaskError(f"this model has no maskable weight named {unknown[0]}")
    saved = []
    with model_lock(model):
        try:
            for name, value in weights.items():
                module, attr, param = targets[name]
                saved.append((module, attr, param))
                module._parameters[attr] = value  # not setattr: nn.Module would demand a Parameter
            yield
        finally:
            for module, attr, param in reversed(saved):
                module._parameters[attr] = param


def check_fits(model, mask: MaskSet) -> None:
    """Refuse a mask whose names or shapes differ from the model's maskable weights."""
    weights = maskable(model)
    for name, m in mask.masks.items():
        if name not in weights:
            raise MaskError(f"mask names {name}, which this model does not have (or does not mask)")
        if tuple(m.shape) != tuple(weights[name].shape):
            raise MaskError(
                f"mask for {name} has shape {list(m.shape)}; the model's is {list(weights[name].shape)}"
            )
    missing = sorted(set(weights) - set(mask.masks))
    if missing:
        raise MaskError(f"mask has no entry for {missing[0]} ({len(missing)} of the model's matrices)")


@contextmanager
def apply_mask(model, mask: MaskSet) -> Iterator:
    """The model with hard mask `mask` applied (w * m for every maskable weight) inside the block."""
    check_fits(model, mask)
    weights = maskable(model)
    masked = {
        n: weights[n].detach() * m.to(weights[n].device, weights[n].dtype) for n, m in mask.masks.items()
    }
    with swapped(model, masked):
        yield model


# --- files ---------------------------------------------------------------------------------


def model_identity(model) -> dict[str, str]:
    info = getattr(model, "workbench", None)
    if info is None:
        return {"model_key": "unknown", "weights_hash": "unknown", "processing": "raw"}
    return {"model_key": info.key, "weights_hash": info.weights_hash, "processing": info.processing}


def save_mask(path: str | Path, mask: MaskSet, model, **settings) -> Path:
    """Write `mask` as safetensors (bool tensors under HF names) with the model's identity and
    `settings` (λ, steps …) as metadata; atomic (temp file + rename)."""
    from safetensors.torch import save_file

    check_fits(model, mask)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**mask.meta, **{k: str(v) for k, v in settings.items()}, **model_identity(model)}
    meta["format"] = FORMAT
    meta["shapes"] = json.dumps({k: list(m.shape) for k, m in mask.masks.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: m.contiguous() for k, m in mask.masks.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_mask(path: str | Path) -> MaskSet:
    """The mask in a file, unvalidated (see `load_mask`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            masks = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file: one line naming it
        raise MaskError(f"{path} is not a safetensors mask file ({err})") from err
    if meta.get("format") != FORMAT:
        raise MaskError(f"{path} is not a workbench mask file (format {meta.get('format')!r})")
    return MaskSet({k: v.bool() for k, v in masks.items()}, meta)


def load_mask(path: str | Path, model) -> MaskSet:
    """Read a mask file and check it was made for this model (key and weights hash) and fits it."""
    mask = read_mask(path)
    mine, theirs = model_identity(model), mask.meta
    if theirs.get("weights_hash") != mine["weights_hash"]:
        raise MaskError(
            f"mask file was trained on {theirs.get('model_key')} (weights {theirs.get('weights_hash', '?')[:8]}…); "
            f"this model is {mine['model_key']} (weights {mine['weights_hash'][:8]}…)"
        )
    check_fits(model, mask)
    return mask
