"""Patchable components: which hook point each is, what one patch replaces, and the map shapes.

| component | hook point               | one patch replaces            | map             |
|-----------|--------------------------|-------------------------------|-----------------|
| resid_pre | blocks.L.hook_resid_pre  | [pos, :] of layer L           | [layer, pos]    |
| attn_out  | blocks.L.hook_attn_out   | [pos, :]                      | [layer, pos]    |
| mlp_out   | blocks.L.hook_mlp_out    | [pos, :]                      | [layer, pos]    |
| heads     | blocks.L.attn.hook_z     | [:, head, :] (all positions)  | [layer, head]   |
| heads_pos | blocks.L.attn.hook_z     | [pos, head, :]                | [layer, head, pos] |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HOOKS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "heads": "blocks.{}.attn.hook_z",
    "heads_pos": "blocks.{}.attn.hook_z",
}
COMPONENTS = tuple(HOOKS)
PER_HEAD = ("heads", "heads_pos")


class ComponentError(ValueError):
    """An unknown component or head; the message lists what exists."""


@dataclass(frozen=True)
class Patch:
    """One patched component: `index` selects from an activation [batch, pos, ...] (batch excluded)."""

    component: str
    layer: int
    pos: int | None  # None: every position
    head: int | None  # None: not a per-head component
    hook: str = ""  # the hook point; HOOKS[component] at layer when empty

    def __post_init__(self):
        if not self.hook:
            object.__setattr__(self, "hook", HOOKS[self.component].format(self.layer))

    @property
    def index(self) -> tuple:
        pos = slice(None) if self.pos is None else self.pos
        return (pos,) if self.head is None else (pos, self.head)


def parse_components(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in HOOKS]
    if unknown or not names:
        raise ComponentError(f"unknown component(s) {unknown or [spec]}; choose from {', '.join(COMPONENTS)}")
    return names


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """'all' or 'layer.head,...' -> (layer, head) pairs, checked against the model."""
    if spec.strip() == "all":
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    heads = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            layer, head = (int(v) for v in item.split("."))
        except ValueError as err:
            raise ComponentError(
                f"head '{item}' must be written layer.head (e.g. 9.6), or heads=all"
            ) from err
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ComponentError(
                f"unknown head {item}: this model has layers 0..{n_layers - 1} and heads 0..{n_heads - 1}"
            )
        heads.append((layer, head))
    if not heads:
        raise ComponentError("heads is empty: give 'all' or layer.head pairs such as 9.6,10.0")
    return heads


def patches(component: str, n_layers: int, n_pos: int, heads: list[tuple[int, int]]) -> list[Patch]:
    """Every patch of one component type for prompts of n_pos tokens."""
    if component == "heads":
        return [Patch(component, layer, None, h) for layer, h in heads]
    if component == "heads_pos":
        return [Patch(component, layer, p, h) for layer, h in heads for p in range(n_pos)]
    return [Patch(component, layer, p, None) for layer in range(n_layers) for p in range(n_pos)]


def map_shape(component: str, n_layers: int, n_heads: int, n_pos: int) -> tuple[int, ...]:
    if component == "heads":
        return (n_layers, n_heads)
    if component == "heads_pos":
        return (n_layers, n_heads, n_pos)
    return (n_layers, n_pos)


def map_index(patch: Patch, offset: int) -> tuple:
    """Where a patch's score goes in its map; positions are shifted by `offset` (end alignment)."""
    if patch.component == "heads":
        return (patch.layer, patch.head)
    if patch.component == "heads_pos":
        return (patch.layer, patch.head, patch.pos + offset)
    return (patch.layer, patch.pos + offset)


def reduce_score(component: str, prod: torch.Tensor) -> torch.Tensor:
    """Sum (a_clean - a_corr) * grad over the feature dims: [batch, pos, d] or [batch, pos, head, d_head]
    -> [batch, pos] / [batch, head] (heads: also over positions) / [batch, head, pos]."""
    if component == "heads":
        return prod.sum(dim=(1, 3))
    if component == "heads_pos":
        return prod.sum(-1).transpose(1, 2)
    return prod.sum(-1)
