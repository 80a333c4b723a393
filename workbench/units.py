"""One unit on your own text: the per-token activation of a neuron or a dictionary latent.

The feature and neuron pages' "test it on your own text" box: one forward pass over the text,
the unit's site read by a hook, the dictionary (if any) encoding it, one activation per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workbench import paths
from workbench.lens import LensError, load_dictionary


def unit_activations(model, text: str, site: str, unit: int, dictionary: str = "") -> dict[str, Any]:
    """Activation of unit `unit` on every token of `text` (BOS prepended, as the Bridge does).

    Without a dictionary the unit is entry `unit` of `site` (flattened per token, e.g. an MLP
    neuron of `blocks.5.mlp.hook_post`); with one, latent `unit` of the dictionary encoding
    its input site. Returns plain data: tokens, token_ids, acts [pos], site, unit.
    """
    if not text or not text.strip():
        raise LensError("type some text first")
    dic = load_dictionary(dictionary) if dictionary else None
    site = (dic.cfg.metadata.hook_name or site) if dic is not None else site
    width = dic.cfg.d_sae if dic is not None else None
    if unit < 0 or (width is not None and unit >= width):
        raise LensError(f"latent {unit} is out of range: this dictionary has latents 0..{width - 1}")
    tokens = model.to_tokens(text)  # [1, pos]
    if tokens.shape[1] > model.cfg.n_ctx:
        raise LensError(f"text is {tokens.shape[1]} tokens; this model takes at most {model.cfg.n_ctx}")
    seen: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        seen["x"] = x.detach()[0].float().reshape(x.shape[1], -1)  # [pos, d]

    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(site, keep)], return_type=None)
    except (KeyError, ValueError) as err:
        raise LensError(f"cannot hook {site} on this model: {err}") from err
    x = seen["x"]
    if dic is not None:
        if x.shape[-1] != dic.cfg.d_in:
            raise LensError(
                f"dictionary input width {dic.cfg.d_in} does not match {site} width {x.shape[-1]}"
            )
        with torch.no_grad():
            x = dic.encode(x.to(dic.W_enc.dtype)).float()
    if unit >= x.shape[-1]:
        raise LensError(f"unit {unit} is out of range: {site} has units 0..{x.shape[-1] - 1}")
    return {
        "tokens": [model.tokenizer.decode([int(t)]) for t in tokens[0]],
        "token_ids": tokens[0].tolist(),
        "acts": x[:, unit].tolist(),
        "site": site,
        "unit": unit,
    }


def dictionary_store(path: str) -> str | None:
    """The store a dictionary was trained on, as a folder path, from its cfg.json
    (`metadata.workbench.store`, named relative to the stores folder); None when it records
    none or that store is not here."""
    folder = Path(path).expanduser()
    try:
        meta = json.loads((folder / "cfg.json").read_text()).get("metadata") or {}
    except (OSError, ValueError):
        return None
    name = (meta.get("workbench") or {}).get("store")
    if not name:
        return None
    root = Path(name).expanduser()
    root = root if root.is_absolute() else paths.stores_dir() / root
    return str(root) if (root / "run.json").exists() else None
