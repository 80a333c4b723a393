"""Hook-site grammar: TransformerLens hook names plus globs.

`*` matches one name component (`blocks.*.mlp.hook_post` = every layer), `**` matches anything,
`{a,b}` alternates (`blocks.*.hook_resid_{pre,mid,post}`). Names are checked against the model's
own hook table before any compute, so a typo fails at once with the valid names listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by whoever passes tensors; listing sites must stay light
    import torch

# Hooks whose tensors are [batch, head, query, key]: stored one row per query token.
_HEAD_MAJOR = ("hook_pattern", "hook_attn_scores")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


class UnknownSiteError(ValueError):
    """A site pattern that matches no hook of the model."""


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
    """`resolve_sites` against the hooks this model can actually store."""
    return resolve_sites(patterns, model.hook_dict, gated_sites(model))


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
