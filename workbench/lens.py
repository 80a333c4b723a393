"""Prompt lens: what one model does on one piece of text, as plain Python data for the app.

One forward pass gives, per token: the MLP neuron activations and residual-stream norm at a layer,
the latents of a sparse dictionary (SAE / transcoder encoder, SAELens `cfg.json` + safetensors
format) at its hook site, and the top next-token predictions. Everything returned is lists and
floats (no tensors), so the app can cache it with `st.cache_data` and re-colour tokens without a
second forward pass. Token-level views follow the feature-dashboard convention of colouring each
token by one unit's activation (Bricken et al. 2023, "Towards Monosemanticity"; sae_vis).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file


class LensError(ValueError):
    """Bad lens input (empty text, layer out of range, unreadable dictionary); one readable message."""


@dataclass
class Dictionary:
    """Encoder half of a sparse dictionary read from a SAELens-format folder."""

    path: str
    site: str
    architecture: str
    W_enc: Float[torch.Tensor, "d_in d_sae"]
    b_enc: Float[torch.Tensor, " d_sae"]
    b_dec: Float[torch.Tensor, " d_in"]
    apply_b_dec_to_input: bool = True
    k: int | None = None
    threshold: torch.Tensor | None = None

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: Float[torch.Tensor, "pos d_in"]) -> Float[torch.Tensor, "pos d_sae"]:
        """ReLU SAE (Bricken et al. 2023), TopK (Gao et al. 2024) or JumpReLU (Rajamanoharan et al. 2024)."""
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = sae_in @ self.W_enc + self.b_enc  # [pos, d_sae]
        if self.architecture == "topk" and self.k:
            vals, idx = torch.relu(pre).topk(min(self.k, pre.shape[-1]), dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        if self.architecture == "jumprelu" and self.threshold is not None:
            return pre * (pre > self.threshold)
        return torch.relu(pre)


def _dictionary_files(folder: Path) -> tuple[dict, Path]:
    cfg_path = folder / "cfg.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not cfg_path.exists() or not weights:
        raise LensError(f"no dictionary at {folder}: expected cfg.json and a .safetensors weights file")
    return json.loads(cfg_path.read_text()), weights[0]


def load_dictionary(path: str | Path) -> Dictionary:
    """The encoder of the dictionary saved at `path` (a folder, or a file inside one)."""
    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    if not folder.is_dir():
        raise LensError(f"no dictionary folder at {path}")
    cfg, weights_path = _dictionary_files(folder)
    weights = load_file(str(weights_path))
    missing = {"W_enc", "b_enc"} - set(weights)
    if missing:
        raise LensError(f"{weights_path} lacks {sorted(missing)}; not an SAE/transcoder encoder")
    meta = cfg.get("metadata") or {}
    site = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("site")
    if not site:
        raise LensError(f"{folder}/cfg.json names no hook site (metadata.hook_name / hook_name)")
    W_enc = weights["W_enc"].float()
    return Dictionary(
        path=str(folder),
        site=site,
        architecture=str(cfg.get("architecture", "standard")).lower(),
        W_enc=W_enc,
        b_enc=weights["b_enc"].float(),
        b_dec=weights.get("b_dec", torch.zeros(W_enc.shape[0])).float(),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        k=cfg.get("k"),
        threshold=weights["threshold"].float() if "threshold" in weights else None,
    )


def _check_layer(model, layer: int) -> None:
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise LensError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")


def _forward(model, tokens: torch.Tensor, sites: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [pos, vocab] and each site's activations [pos, d] from one forward pass."""
    acts: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def hook(x, hook):
            acts[name] = x.detach()[0].float().reshape(x.shape[1], -1)
            return x

        return hook

    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(s, keeper(s)) for s in dict.fromkeys(sites)], return_type="logits"
        )
    return logits[0].float(), acts


def _top(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    vals, idx = row.topk(min(k, row.numel()))
    return [(int(i), round(float(v), 5)) for i, v in zip(idx, vals)]


def _predictions(model, logits: Float[torch.Tensor, "pos vocab"], k: int) -> list[list[dict[str, Any]]]:
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)  # [pos, k]
    decode = model.tokenizer.decode
    return [
        [
            {"token": decode([int(i)]), "prob": round(float(p), 5), "logit": round(float(logits[pos, i]), 4)}
            for p, i in zip(top_p[pos], top_i[pos])
        ]
        for pos in range(len(logits))
    ]


def prompt_lens(model, text: str, layer: int, dictionary: str = "", k: int = 10) -> dict[str, Any]:
    """Everything the prompt lens shows for `text` at `layer`, from one forward pass.

    Returns plain data: `tokens` [pos] strings, `token_ids`, `neurons` [pos][d_mlp] (MLP
    `hook_post`), `resid_norm` [pos] (L2 norm of `hook_resid_post`), `latents` [pos][d_sae] and
    `latent_site` when a dictionary is given, `top_neurons` / `top_latents` [pos][k] (index,
    activation) and `predictions` [pos][k] (token, prob, logit) for the next token.
    """
    if not text or not text.strip():
        raise LensError("type some text first")
    _check_layer(model, layer)
    dic = load_dictionary(dictionary) if dictionary else None
    mlp, resid = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_post"
    tokens = model.to_tokens(text)  # [1, pos], BOS prepended as the Bridge does by default
    if tokens.shape[1] > model.cfg.n_ctx:
        raise LensError(f"text is {tokens.shape[1]} tokens; this model takes at most {model.cfg.n_ctx}")
    try:
        logits, acts = _forward(model, tokens, [mlp, resid] + ([dic.site] if dic else []))
    except (KeyError, ValueError) as err:
        raise LensError(f"cannot hook this model: {err}") from err
    out: dict[str, Any] = {
        "tokens": [model.tokenizer.decode([int(t)]) for t in tokens[0]],
        "token_ids": tokens[0].tolist(),
        "layer": layer,
        "neurons": acts[mlp].tolist(),
        "resid_norm": acts[resid].norm(dim=-1).tolist(),
        "top_neurons": [_top(row, k) for row in acts[mlp]],
        "predictions": _predictions(model, logits, k),
        "latents": None,
        "top_latents": None,
        "latent_site": None,
    }
    if dic is not None:
        if acts[dic.site].shape[-1] != dic.W_enc.shape[0]:
            raise LensError(
                f"dictionary input width {dic.W_enc.shape[0]} does not match {dic.site} "
                f"width {acts[dic.site].shape[-1]}: it was trained on another model"
            )
        latents = dic.encode(acts[dic.site])  # [pos, d_sae]
        out |= {
            "latents": latents.tolist(),
            "top_latents": [_top(row, k) for row in latents],
            "latent_site": dic.site,
        }
    return out


def dictionary_info(path: str | Path) -> dict[str, Any]:
    """Site, width and architecture of a saved dictionary, from its cfg.json alone (no weights read)."""
    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    if not folder.is_dir():
        raise LensError(f"no dictionary folder at {path}")
    cfg, _ = _dictionary_files(folder)
    meta = cfg.get("metadata") or {}
    return {
        "path": str(folder),
        "site": meta.get("hook_name") or cfg.get("hook_name") or cfg.get("site"),
        "d_sae": cfg.get("d_sae"),
        "d_in": cfg.get("d_in"),
        "architecture": cfg.get("architecture", "standard"),
    }


def config_fields(name: str) -> list[dict[str, Any]]:
    """The form of analysis `name`: each config field's name, kind (int/float/bool/str/list), default, doc."""
    import dataclasses
    import typing

    from workbench import analysis

    spec = analysis.get(name)
    docs = analysis.field_docs(spec.config_cls)
    hints = typing.get_type_hints(spec.config_cls)
    defaults = spec.make_config()
    rows = []
    for f in dataclasses.fields(spec.config_cls):
        hint, value = hints[f.name], getattr(defaults, f.name)
        kind = {int: "int", float: "float", bool: "bool", str: "str"}.get(hint, "str")
        if typing.get_origin(hint) in (tuple, list) or isinstance(value, (tuple, list)):
            kind, value = "list", ",".join(map(str, value))
        elif kind == "str" and not isinstance(value, str):
            value = "" if value is None else str(value)
        rows.append({"name": f.name, "kind": kind, "default": value, "doc": docs.get(f.name, "")})
    return rows


def parse_form(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Form values back to config overrides: list fields split on commas, other kinds kept as typed."""
    kinds = {f["name"]: f["kind"] for f in config_fields(name)}
    unknown = set(values) - set(kinds)
    if unknown:
        raise LensError(f"{name} has no option(s) {sorted(unknown)}")
    return {
        k: tuple(s.strip() for s in str(v).split(",") if s.strip()) if kinds[k] == "list" else v
        for k, v in values.items()
    }
