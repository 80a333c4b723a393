"""Hook-site grammar: TransformerLens hook names plus globs.

`*` matches one name component (`blocks.*.mlp.hook_post` = every layer), `**` matches anything,
`{a,b}` alternates (`blocks.*.hook_resid_{pre,mid,post}`). Names are checked against the model's
own hook table before any compute, so a typo fails at once with the valid names listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

# Hooks whose tensors are [batch, head, query, key]: stored one row per query token.
_HEAD_MAJOR = ("hook_pattern", "hook_attn_scores")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


class UnknownSiteError(ValueError):
    """A site pattern that matches no hook of the model."""


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
            end = pattern.index("}", i)
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


def resolve_sites(patterns: str | Sequence[str], valid: Iterable[str]) -> list[str]:
    """Expand patterns against the model's hook names, in layer order, without duplicates."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(";") if p.strip()]
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
        if not hits:
            listing = ", ".join(summarize(valid))
            raise UnknownSiteError(f"site '{pattern}' matches no hook of this model. Valid sites: {listing}")
        chosen.update(hits)
    return sorted(chosen, key=_sort_key)


def model_sites(model) -> list[str]:
    return sorted(model.hook_dict.keys(), key=_sort_key)


def to_rows(site: str, act: torch.Tensor) -> torch.Tensor:
    """[batch, pos, ...] (or [batch, head, q, k]) -> [batch*pos, ...]: one row per token."""
    if site.endswith(_HEAD_MAJOR) and act.ndim == 4:
        act = act.permute(0, 2, 1, 3)
    return act.reshape(act.shape[0] * act.shape[1], *act.shape[2:])
