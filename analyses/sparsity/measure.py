"""Activation-ratio measurement over an activation store (Lazy Neuron; Li et al. 2023, arXiv 2210.06313).

Three per-neuron firing definitions, streamed shard by shard:
  * ``nonzero``: a_i != 0 (the paper's measure; exact for ReLU, ~always true for GELU/SiLU),
  * ``eps``:     |a_i| > eps (a FAT-eps style magnitude threshold that also works for smooth activations),
  * ``pre_pos``: the pre-activation (gate output for gated MLPs) is > 0.
A neuron's firing rate is the fraction of kept tokens on which it fires; a layer's activation
ratio is the mean firing rate over its neurons (= the fraction of nonzero entries averaged over tokens).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from workbench.store import ActivationStore, StoreError

DEFINITIONS = ("nonzero", "eps", "pre_pos")
POST = "blocks.{}.mlp.hook_post"
PRE = "blocks.{}.mlp.hook_pre"


def mlp_layers(store: ActivationStore) -> list[int]:
    """Layers whose `mlp.hook_post` the store holds (sorted); a readable error when there are none."""
    layers = sorted(
        int(s.split(".")[1]) for s in store.sites if s.startswith("blocks.") and s.endswith(".mlp.hook_post")
    )
    if not layers:
        raise StoreError(
            f"store {store.root} holds no blocks.*.mlp.hook_post site (it has {', '.join(store.sites)}); "
            "capture with --sites blocks.*.mlp.hook_post,blocks.*.mlp.hook_pre"
        )
    return layers


def keep_mask(store: ActivationStore, skip_bos: bool) -> torch.Tensor:
    """[rows] bool: the rows that count (position 0 left out when `skip_bos`)."""
    pos = torch.from_numpy(store.tokens().column("pos").to_numpy().copy())
    return pos != 0 if skip_bos else torch.ones_like(pos, dtype=torch.bool)


def _count_site(store: ActivationStore, site: str, keep: torch.Tensor, tests: list) -> list[torch.Tensor]:
    """For each predicate (acts [rows, d_mlp] -> bool), its per-neuron count over kept rows: [d_mlp] int64."""
    counts = [torch.zeros(store.shape(site)[-1], dtype=torch.int64) for _ in tests]
    for i, rec in enumerate(store.records(site)):
        acts = store.shard(site, i)[keep[rec.row_start : rec.row_end]]  # [rows, d_mlp]
        for count, fires in zip(counts, tests):
            count += fires(acts).sum(0)
    return counts


def firing_rates(
    store: ActivationStore, layers: list[int], eps: float, skip_bos: bool, progress
) -> tuple[dict[str, Float[torch.Tensor, "layer d_mlp"]], int]:
    """Per-neuron firing rates under each definition -> ({definition: [layer, d_mlp]}, kept tokens).

    ``pre_pos`` is left out when the store has no `mlp.hook_pre` sites.
    """
    keep = keep_mask(store, skip_bos)
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        raise ValueError("no tokens left to measure (store empty, or only BOS positions)")
    has_pre = all(PRE.format(layer) in store.sites for layer in layers)
    counts: dict[str, list[torch.Tensor]] = {d: [] for d in DEFINITIONS if d != "pre_pos" or has_pre}
    for layer in progress(layers, desc="sparsity: firing rates"):
        post = POST.format(layer)
        nonzero, above = _count_site(store, post, keep, [lambda a: a != 0, lambda a: a.abs() > eps])
        counts["nonzero"].append(nonzero)
        counts["eps"].append(above)
        if has_pre:
            counts["pre_pos"] += _count_site(store, PRE.format(layer), keep, [lambda a: a > 0])
    rates = {d: (torch.stack(c).double() / n_tokens).float() for d, c in counts.items()}
    return rates, n_tokens


def calibration_rows(store: ActivationStore, skip_bos: bool, n: int) -> torch.Tensor:
    """Row indices of an evenly strided, deterministic sample of at most `n` kept rows."""
    rows = torch.nonzero(keep_mask(store, skip_bos)).squeeze(-1)
    if len(rows) <= n:
        return rows
    return rows[torch.linspace(0, len(rows) - 1, n).round().long()]


def read_rows(store: ActivationStore, site: str, rows: torch.Tensor) -> Float[torch.Tensor, "n d_mlp"]:
    """Activations of `site` at the (sorted) row indices, one shard at a time."""
    parts = []
    for i, rec in enumerate(store.records(site)):
        inside = rows[(rows >= rec.row_start) & (rows < rec.row_end)]
        if len(inside):
            parts.append(store.shard(site, i)[inside - rec.row_start].float())
    return torch.cat(parts)
