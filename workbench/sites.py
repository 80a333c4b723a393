"""Hook-site grammar: TransformerLens hook names plus globs.

`*` matches one name component (`blocks.*.mlp.hook_post` = every layer), `**` matches anything,
`{a,b}` alternates (`blocks.*.hook_resid_{pre,mid,post}`). Names are checked against the model's
own hook table before any compute, so a typo fails at once with the valid names listed.

One name per tensor: TransformerBridge lists several names for one HookPoint (`blocks.5.hook_out`
is `blocks.5.hook_resid_post`). The canonical name is the TransformerLens one (the key of the
Bridge components' `hook_aliases`); globs expand to canonical names only, and every alias is
accepted as input and mapped to its canonical name (`canonical`, `held_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by whoever passes tensors; listing sites must stay light
    import torch

# Hooks whose tensors are [batch, head, query, key]: stored one row per query token.
_HEAD_MAJOR = ("hook_pattern", "hook_attn_scores")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


class UnknownSiteError(ValueError):
    """A site pattern that matches no hook of the model."""


def _preference(name: str) -> tuple[bool, int, str]:
    """Which of the names of one HookPoint is canonical: the TransformerLens alias. The Bridge's
    own names end in a submodule's `.hook_in`/`.hook_out`; of the rest the shortest wins
    (`blocks.5.hook_attn_in` over `blocks.5.attn.hook_attn_in`). Checked against `hook_aliases`
    on GPT-2, Llama and NeoX shapes in tests/test_sites.py."""
    return (name.rsplit(".", 1)[-1] in ("hook_in", "hook_out"), len(name), name)


def alias_table(hook_dict: Mapping[str, object]) -> dict[str, str]:
    """Every hook name -> its canonical name (itself when no other name shares its HookPoint)."""
    groups: dict[int, list[str]] = {}
    for name, point in hook_dict.items():
        groups.setdefault(id(point), []).append(name)
    return {n: min(names, key=_preference) for names in groups.values() for n in names}


def _hooks(model_or_hook_dict) -> Mapping[str, object]:
    hook_dict = getattr(model_or_hook_dict, "hook_dict", model_or_hook_dict)
    return hook_dict  # the Bridge rebuilds this table per access (~20 ms): read it once per call


def canonical(model_or_hook_dict, name: str) -> str:
    """The canonical (TransformerLens) name of hook `name` of this model; aliases map to it.
    An unknown name is an `UnknownSiteError` listing the valid ones."""
    table = alias_table(_hooks(model_or_hook_dict))
    if name not in table:
        valid = ", ".join(summarize(set(table.values())))
        raise UnknownSiteError(f"site '{name}' is no hook of this model. Valid sites: {valid}")
    return table[name]


# Model-free alias -> canonical rewrites (the Bridge's names; see `alias_table`), for reading a
# store without booting its model. `mlp.in.hook_out` is left out on purpose: it is
# `mlp.hook_pre` in GPT-2/NeoX but `mlp.hook_pre_linear` in gated (Llama) MLPs; stores record
# their own table (`run.json` "aliases") for such names.
_REWRITES = {
    "hook_in": "hook_resid_pre",
    "hook_out": "hook_resid_post",
    "ln2.hook_in": "hook_resid_mid",
    "attn.hook_out": "hook_attn_out",
    "mlp.hook_out": "hook_mlp_out",
    "attn.hook_attn_in": "hook_attn_in",
    "attn.hook_q_input": "hook_q_input",
    "attn.hook_k_input": "hook_k_input",
    "attn.hook_v_input": "hook_v_input",
    "attn.q.hook_out": "attn.hook_q",
    "attn.k.hook_out": "attn.hook_k",
    "attn.v.hook_out": "attn.hook_v",
    "attn.o.hook_in": "attn.hook_z",
    "mlp.gate.hook_out": "mlp.hook_pre",
    "mlp.out.hook_in": "mlp.hook_post",
}
_TOP_REWRITES = {
    "embed.hook_out": "hook_embed",
    "pos_embed.hook_out": "hook_pos_embed",
    "rotary_emb.hook_out": "hook_pos_embed",
    "unembed.hook_out": "hook_unembed",
}
_BLOCK = re.compile(r"^(blocks\.\d+\.)(.+)$")


def model_free_canonical(name: str) -> str:
    """The canonical name of a Bridge alias without the model (`blocks.5.hook_out` ->
    `blocks.5.hook_resid_post`); names it cannot place (`mlp.in.hook_out`) are returned as given."""
    m = _BLOCK.match(name)
    if m:
        return m.group(1) + _REWRITES.get(m.group(2), m.group(2))
    return _TOP_REWRITES.get(name, name)


def held_name(name: str, held: Iterable[str], recorded: Mapping[str, str] | None = None) -> str | None:
    """The name under which a collection of canonical sites (a store's) holds hook `name`, alias
    or not, without the model: `recorded` (alias -> canonical, written at capture) first, then the
    Bridge's fixed alias names. None when it holds no such tensor."""
    held = set(held)
    for candidate in (name, (recorded or {}).get(name), model_free_canonical(name)):
        if candidate in held:
            return candidate
    return None


def split_patterns(text: str) -> list[str]:
    """Split a site list on commas (or semicolons) outside braces: `a.{pre,post},b` -> [`a.{pre,post}`, `b`]."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UnknownSiteError(f"malformed site list '{text}': '}}' without '{{'")
        if ch in ",;" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise UnknownSiteError(f"malformed site list '{text}': '{{' without '}}'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def pattern_to_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]+")
            i += 1
        elif pattern[i] == "{":
            end = pattern.find("}", i)
            if end < 0:
                raise ValueError("'{' without '}'")
            out.append("(?:" + "|".join(re.escape(a) for a in pattern[i + 1 : end].split(",")) + ")")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def layer_of(site: str) -> int | None:
    m = _LAYER.match(site)
    return int(m.group(1)) if m else None


def _sort_key(site: str) -> tuple[int, str]:
    layer = layer_of(site)
    return (-1 if layer is None else layer, site)


def summarize(names: Iterable[str]) -> list[str]:
    """Collapse per-layer names into `blocks.*.…` forms for readable error messages."""
    return sorted({_LAYER.sub("blocks.*.", n) for n in names})


def resolve_sites(
    patterns: str | Sequence[str], valid: Iterable[str], gated: dict[str, str] | None = None
) -> list[str]:
    """Expand patterns against the model's hook names, in layer order, without duplicates.

    `gated` maps hook names the model lists but does not compute (TransformerBridge hooks that
    need a `set_use_*` switch) to the switch: a glob skips them, a pattern that names only such
    hooks is an error saying why."""
    gated = gated or {}
    if isinstance(patterns, str):
        patterns = split_patterns(patterns)
    if not patterns:
        raise UnknownSiteError(
            "no sites given; pass TransformerLens hook names such as blocks.*.mlp.hook_post"
        )
    valid = sorted(set(valid))
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = pattern_to_regex(pattern)
        except ValueError as err:
            raise UnknownSiteError(f"malformed site pattern '{pattern}': {err}") from err
        hits = [n for n in valid if regex.match(n)]
        if hits and all(n in gated for n in hits):
            raise UnknownSiteError(
                f"site '{pattern}' cannot be stored: the model computes {hits[0]} only with "
                f"{gated[hits[0]]} switched on; pick another site"
            )
        hits = [n for n in hits if n not in gated]
        if not hits:
            listing = ", ".join(summarize(valid))
            raise UnknownSiteError(f"site '{pattern}' matches no hook of this model. Valid sites: {listing}")
        chosen.update(hits)
    return sorted(chosen, key=_sort_key)


def model_sites(model) -> list[str]:
    return sorted(model.hook_dict.keys(), key=_sort_key)


def gated_sites(model) -> dict[str, str]:
    """Hook names the model lists but only computes behind a switch (e.g. use_hook_mlp_in)."""
    reason = getattr(model, "_gated_hook_reason", None)
    if reason is None:
        return {}
    return {n: r for n in model.hook_dict if (r := reason(n)) is not None}


def resolve_for_model(patterns: str | Sequence[str], model) -> list[str]:
    """`resolve_sites` against the hooks this model can actually store, as canonical names: an
    alias and its canonical name (or a glob matching both) give one site, so one stored tensor."""
    hook_dict = model.hook_dict
    table = alias_table(hook_dict)
    hits = resolve_sites(patterns, hook_dict, gated_sites(model))
    return sorted(dict.fromkeys(table[n] for n in hits), key=_sort_key)


def recorded_aliases(model, names: Iterable[str]) -> dict[str, str]:
    """alias -> canonical for every other name of the given canonical sites (for a store's run.json)."""
    wanted = set(names)
    return {a: c for a, c in alias_table(model.hook_dict).items() if c in wanted and a != c}


def check_layers(patterns: str | Sequence[str], n_layers: int) -> None:
    """Before the model loads: every explicit `blocks.N.` names an existing layer."""
    for pattern in split_patterns(patterns) if isinstance(patterns, str) else patterns:
        layer = layer_of(pattern)
        if layer is not None and layer >= n_layers:
            raise UnknownSiteError(
                f"site '{pattern}' names layer {layer}, but the model has layers 0..{n_layers - 1}"
            )


def to_rows(site: str, act: torch.Tensor) -> torch.Tensor:
    """[batch, pos, ...] (or [batch, head, q, k]) -> [batch*pos, ...]: one row per token."""
    if site.endswith(_HEAD_MAJOR) and act.ndim == 4:
        act = act.permute(0, 2, 1, 3)
    return act.reshape(act.shape[0] * act.shape[1], *act.shape[2:])
