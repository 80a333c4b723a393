"""Prompt lens: what one model does on one piece of text, as plain Python data for the app.

One forward pass gives, per token: the MLP neuron activations and residual-stream norm at a layer,
the latents of a sparse dictionary (any SAELens-format folder: `cfg.json` + safetensors, encoded
by SAELens' own class for its architecture) at its hook site, and the top next-token predictions. Everything returned is lists and
floats (no tensors), so the app can cache it with `st.cache_data` and re-colour tokens without a
second forward pass. Token-level views follow the feature-dashboard convention of colouring each
token by one unit's activation (Bricken et al. 2023, "Towards Monosemanticity"; sae_vis).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from workbench import firing


class LensError(ValueError):
    """Bad lens input (empty text, layer out of range, unreadable dictionary); one readable message."""


def _dictionary_files(folder: Path) -> tuple[dict, Path]:
    cfg_path = folder / "cfg.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not cfg_path.exists() or not weights:
        raise LensError(f"no dictionary at {folder}: expected cfg.json and a .safetensors weights file")
    return json.loads(cfg_path.read_text()), weights[0]


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    folder = folder.parent if folder.is_file() else folder
    if not folder.is_dir():
        raise LensError(f"no dictionary folder at {path}")
    return folder


def load_dictionary(path: str | Path):
    """A SAELens `SAE` (any architecture registered with SAELens, ours included once `sae` is
    imported) from a SAELens-format folder; its `encode` gives the latents."""
    folder = _folder(path)
    cfg, _ = _dictionary_files(folder)
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY

    arch = cfg.get("architecture", "standard")
    if arch not in SAE_CLASS_REGISTRY:
        raise LensError(f"{folder}: architecture '{arch}' is not an inference SAE class known to SAELens")
    try:
        return SAE.load_from_disk(str(folder), device="cpu")
    except Exception as err:  # noqa: BLE001 - SAELens raises many types on bad files
        raise LensError(f"cannot load the dictionary at {folder}: {err}") from err


def _check_dictionary(dic, model, name: str) -> None:
    """A dictionary of another model, weight processing or width: one line, before the forward pass."""
    from workbench.sae.compat import DictionaryMismatchError, check_model

    try:
        check_model(dic, model, str(name))
    except DictionaryMismatchError as err:
        raise LensError(str(err)) from err


def _check_layer(model, layer: int) -> None:
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise LensError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")


def _forward(model, tokens: torch.Tensor, sites: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [pos, vocab] and each site's activations (batch dimension dropped: [pos, ...], or
    [n_heads, q, k] for the attention pattern) from one forward pass."""
    acts: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def hook(x, hook):
            acts[name] = x.detach()[0].float()
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


def _top_signed(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """Units ranked by |a| with the sign kept (workbench.firing's rule for one prompt): SwiGLU
    neurons take both signs, and a strongly negative one matters as much as a positive one."""
    return [(i, round(a, 5)) for i, a in firing.top_units(row, k)]


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


LOGIT_LENS = "W_U · final_norm(resid_post of the layer) + b_U: the model's own final norm and unembedding"


def _logit_lens(model, resid: list[Float[torch.Tensor, "pos d_model"]], k: int) -> list[list[list[dict]]]:
    """[layer][pos][k] top next tokens read from each layer's residual stream through the final
    norm, then the unembedding (nostalgebraist 2020, "interpreting GPT: the logit lens"). At the
    last layer this is the model's own prediction."""
    with torch.no_grad():
        return [_predictions(model, model.unembed(model.ln_final(r[None]))[0].float(), k) for r in resid]


def _live(acts: Float[torch.Tensor, "pos n"], first: int) -> int:
    """The unit with the largest |activation| on the prompt from position `first` on (BOS left out):
    the one worth opening first, instead of unit 0 (which may never fire)."""
    rows = acts[first:] if acts.shape[0] > first else acts
    return int(rows.abs().amax(0).argmax())


def _encode(dic, x: torch.Tensor) -> Float[torch.Tensor, "pos d_sae"]:
    """Latents of [pos, d_in] or [pos, n_heads, d_head] (hook_z) activations. SAELens' hook_z
    dictionaries flatten heads themselves only when their reshaping mode is on; we flatten here."""
    if getattr(dic, "hook_z_reshaping_mode", False):
        dic.turn_off_forward_pass_hook_z_reshaping()
    x = x.flatten(1)
    if x.shape[-1] != dic.cfg.d_in:
        raise LensError(
            f"dictionary input width {dic.cfg.d_in} does not match {dic.cfg.metadata.hook_name} "
            f"width {x.shape[-1]}: it was trained on another model"
        )
    with torch.no_grad():
        return dic.encode(x).float()


def prompt_lens(
    model, text: str, layer: int, dictionary: str = "", k: int = 10, logit_k: int = 5
) -> LensView:
    """Everything the prompt lens shows for `text` at `layer`, from one forward pass.

    Returns plain data: `tokens` [pos] strings, `token_ids`, `bos` (position 0 is BOS: left out of
    colour scales and live-unit picks), `neurons` [pos][d_mlp] (MLP `hook_post`), `resid_norm`
    [pos] (L2 norm of `hook_resid_post`), `attention` [n_heads][q][k] (the layer's pattern),
    `logit_lens` [layer][pos][logit_k] (token, prob, logit; see LOGIT_LENS), `top_neurons`
    [pos][k] (index, activation) ranked by |activation| with the sign kept, `first_neuron` (the
    largest |activation| after BOS), and with a dictionary `latents` [pos][d_sae], `latent_site`
    (canonical name), `top_latents` [pos][k] and `first_latent`; `predictions` [pos][k] for the
    next token. In Jupyter the result shows the tokens coloured by residual norm.
    """
    if not text or not text.strip():
        raise LensError("type some text first")
    _check_layer(model, layer)
    dic = load_dictionary(dictionary) if dictionary else None
    site = (dic.cfg.metadata.hook_name or "") if dic is not None else ""
    if dic is not None and not site:
        raise LensError(f"{dictionary}/cfg.json names no hook site (metadata.hook_name)")
    if dic is not None:
        _check_dictionary(dic, model, dictionary)
        site = _canonical_site(model, site, dictionary)
    mlp, pattern = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.attn.hook_pattern"
    resid = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    tokens = model.to_tokens(text)  # [1, pos], BOS prepended as the Bridge does by default
    if tokens.shape[1] > model.cfg.n_ctx:
        raise LensError(f"text is {tokens.shape[1]} tokens; this model takes at most {model.cfg.n_ctx}")
    try:
        logits, acts = _forward(model, tokens, [mlp, pattern, *resid] + ([site] if site else []))
    except (KeyError, ValueError) as err:
        raise LensError(f"cannot hook this model: {err}") from err
    bos = model.tokenizer.bos_token_id is not None and int(tokens[0, 0]) == model.tokenizer.bos_token_id
    neurons = acts[mlp].flatten(1)
    out = LensView(
        tokens=[model.tokenizer.decode([int(t)]) for t in tokens[0]],
        token_ids=tokens[0].tolist(),
        bos=bos,
        layer=layer,
        neurons=neurons.tolist(),
        resid_norm=acts[resid[layer]].norm(dim=-1).tolist(),
        attention=acts[pattern].round(decimals=5).tolist(),
        logit_lens=_logit_lens(model, [acts[r] for r in resid], logit_k),
        top_neurons=[_top_signed(row, k) for row in neurons],
        first_neuron=_live(neurons, int(bos)),
        predictions=_predictions(model, logits, k),
        latents=None,
        top_latents=None,
        latent_site=None,
        first_latent=None,
    )
    if dic is not None:
        latents = _encode(dic, acts[site])
        out |= {
            "latents": latents.tolist(),
            "top_latents": [_top(row, k) for row in latents],
            "latent_site": site,
            "first_latent": _live(latents, int(bos)),
        }
    return out


def _canonical_site(model, site: str, dictionary: str) -> str:
    from workbench import sites

    try:
        return sites.canonical(model, site)
    except sites.UnknownSiteError as err:
        raise LensError(f"dictionary {dictionary} reads {site}, which is no hook of this model") from err


class LensView(dict):
    """The prompt lens's plain data (a dict, so the app can cache it); in Jupyter it renders the
    tokens coloured by residual norm, BOS left out of the scale (`show` for other values)."""

    def show(self, values: list[float] | None = None, title: str = ""):
        """The tokens coloured by `values` [pos] (default: the residual norm) as a Jupyter-displayable view."""
        from workbench.highlight import show_tokens

        if values is None:
            values, title = self["resid_norm"], title or f"residual-stream norm after layer {self['layer']}"
        return show_tokens(self["tokens"], values, title, [0] if self["bos"] else [])

    def _repr_html_(self) -> str:
        return self.show().html()


def dictionary_info(path: str | Path) -> dict[str, Any]:
    """Site, width and architecture of a saved dictionary, from its cfg.json alone (no weights read)."""
    folder = _folder(path)
    cfg, _ = _dictionary_files(folder)
    meta = cfg.get("metadata") or {}
    return {
        "path": str(folder),
        "site": meta.get("hook_name") or cfg.get("hook_name") or cfg.get("site"),
        "d_sae": cfg.get("d_sae"),
        "d_in": cfg.get("d_in"),
        "architecture": cfg.get("architecture", "standard"),
        "model": meta.get("model_name"),
    }


def config_fields(name: str) -> list[dict[str, Any]]:
    """The form of analysis `name`: each config field's name, kind (int/float/bool/str/list), default,
    doc, `choices` (the allowed values of a Literal field, else None) and declared `input` kind."""
    import dataclasses
    import typing

    from workbench import analysis, checks

    spec = analysis.get(name)
    docs = analysis.field_docs(spec.config_cls)
    hints = typing.get_type_hints(spec.config_cls)
    defaults = spec.make_config()
    rows = []
    for f in dataclasses.fields(spec.config_cls):
        hint, value = hints[f.name], getattr(defaults, f.name)
        kind = {int: "int", float: "float", bool: "bool", str: "str"}.get(hint, "str")
        allowed = checks.choices(hint)
        if typing.get_origin(hint) in (tuple, list) or isinstance(value, (tuple, list)):
            kind, value = "list", ",".join(map(str, value))
        elif kind == "str" and not isinstance(value, str):
            value = "" if value is None else str(value)
        rows.append(
            {
                "name": f.name,
                "kind": kind,
                "default": value,
                "doc": docs.get(f.name, ""),
                "choices": list(allowed) if allowed else None,  # a selectbox, not free text
                "input": f.metadata.get("input"),  # store, model, data, dictionary, task...
            }
        )
    return rows


def parse_form(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Form values back to config overrides: list fields split on commas, other kinds kept as typed."""
    from workbench import sites

    kinds = {f["name"]: f["kind"] for f in config_fields(name)}
    unknown = set(values) - set(kinds)
    if unknown:
        raise LensError(f"{name} has no option(s) {sorted(unknown)}")
    return {k: tuple(sites.split_patterns(str(v))) if kinds[k] == "list" else v for k, v in values.items()}


def list_dictionaries() -> list[dict[str, Any]]:
    """Every dictionary folder under `$WORKBENCH_HOME/dictionaries` (where training saves them)."""
    from workbench import paths

    rows = []
    for cfg_path in sorted((paths.home() / "dictionaries").glob("*/cfg.json")):
        try:
            rows.append(dictionary_info(cfg_path.parent))
        except (LensError, OSError, ValueError):
            continue
    return rows
