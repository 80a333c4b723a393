"""Which stored rows a dictionary trains on and is scored on: one rule for training and evaluation.

* **Special tokens**: position 0 under the prepend BOS policy, and every row whose token is one of
  the tokenizer's structural special ids (SAELens' `get_special_token_ids`: BOS/EOS/PAD…, e.g.
  SmolLM2's `<|im_end|>` document separators) — what SAELens leaves out with
  `exclude_special_tokens=True`.
* **Norm outliers**: a row whose L2 norm exceeds `outlier_factor` × the site's median row norm
  (median over up to 65,536 non-special rows, strided over the whole store) at any site read. On
  smollm2-135m `blocks.15.hook_resid_post` the 99.9th percentile is 1.5× the median (170) while
  the massive-activation rows (almost all at position 1) reach ~100×, and 0.05 % of the rows hold
  85 % of the variance (measured on the first 49k rows of the 1M-token store), so FVU over all
  tokens measures those few rows.
* **Split**: sequence s of n is held out when (n − 1 − s) % held_out_every == 0: every
  held_out_every-th sequence counting back from the last (so at least one is held out),
  interleaved through the store so held-out rows come from the same mix of sources as the
  training rows; whole sequences, so no held-out token's context was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from workbench.store import ActivationStore

log = logging.getLogger(__name__)
SPLITS = ("train", "held_out", "all")
MEDIAN_ROWS = 65536


@dataclass(frozen=True)
class RowRule:
    """The stated row rule; `describe()` is what results and dictionaries record."""

    skip_special: bool = True
    outlier_factor: float = 5.0
    held_out_every: int = 20

    def describe(self) -> str:
        parts = []
        if self.skip_special:
            parts.append("BOS (position 0) and special-token rows (tokenizer's BOS/EOS/PAD ids) excluded")
        if self.outlier_factor > 0:
            parts.append(f"rows with L2 norm > {self.outlier_factor:g} x the site's median row norm excluded")
        if self.held_out_every > 0:
            parts.append(
                f"every {self.held_out_every}th sequence (counting back from the last) held out from training"
            )
        return "; ".join(parts) or "every row used"


@dataclass
class Rows:
    """Rows of one split: `keep` [n_rows] are its ordinary tokens, `all_but_bos` every row of the split
    except position 0 (special tokens and outliers included: the pre-rule "all tokens" definition)."""

    split: str
    keep: Tensor
    all_but_bos: Tensor
    norms: dict[str, Tensor] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def special_token_ids(store: ActivationStore) -> list[int]:
    """The store model's structural special ids (SAELens' rule), plus the tokens found at position 0."""
    pos0 = store.token_ids()[store.positions() == 0] if store.config.get("bos") == "prepend" else None
    ids = set(pos0.unique().tolist()) if pos0 is not None and len(pos0) else set()
    try:
        from sae_lens.util import get_special_token_ids
        from transformers import AutoTokenizer

        from workbench.models import ModelNotAvailableError, resolve

        tokenizer = AutoTokenizer.from_pretrained(resolve(str(store.config["model"]))[0])
        ids |= set(get_special_token_ids(tokenizer))
    except (OSError, ValueError, KeyError, ModelNotAvailableError) as err:
        log.warning(
            "special tokens of %s unknown (%s); excluding position 0 only", store.config.get("model"), err
        )
    return sorted(ids)


def split_mask(store: ActivationStore, held_out_every: int, split: str) -> Tensor:
    """[n_rows] bool: the rows of `split` ('train', 'held_out' or 'all') under the sequence rule above."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not '{split}'")
    seq = torch.from_numpy(store.tokens().column("seq").to_numpy().astype("int64"))
    if split == "all":
        return torch.ones(len(seq), dtype=torch.bool)
    n_seqs = int(seq.max()) + 1 if len(seq) else 0
    held = (n_seqs - 1 - seq) % held_out_every == 0 if held_out_every > 0 else torch.zeros_like(seq).bool()
    return held if split == "held_out" else ~held


def special_mask(store: ActivationStore, special_ids: list[int]) -> Tensor:
    """[n_rows] bool: BOS-position rows and rows holding a special token."""
    tok = store.token_ids()
    special = torch.isin(tok, torch.tensor(special_ids, dtype=tok.dtype))
    if store.config.get("bos", "prepend") == "prepend":
        special |= store.positions() == 0
    return special


def site_norms(store: ActivationStore, site: str) -> Tensor:
    """[n_rows] float32 L2 norm of every stored row of a site (one pass over its shards)."""
    return torch.cat(
        [store.shard(site, j).flatten(1).float().norm(dim=-1) for j in range(store.n_shards(site))]
    )


def select_rows(
    store: ActivationStore,
    sites: list[str],
    rule: RowRule,
    split: str,
    special_ids: list[int] | None = None,
    norms: dict[str, Tensor] | None = None,
) -> Rows:
    """The ordinary rows of `split` under `rule` and what was excluded (counts within the split).
    `norms` (site -> [n_rows], from an earlier call) saves a pass over the shards."""
    in_split = split_mask(store, rule.held_out_every, split)
    if rule.skip_special:
        special = special_mask(store, special_token_ids(store) if special_ids is None else special_ids)
    else:
        special = torch.zeros_like(in_split)
    outlier = torch.zeros_like(in_split)
    norms, medians = dict(norms or {}), {}
    if rule.outlier_factor > 0:
        for site in sites:
            norms[site] = n = norms[site] if site in norms else site_norms(store, site)
            idx = torch.nonzero(~special).squeeze(-1)
            sample = idx[:: max(1, len(idx) // MEDIAN_ROWS)]  # strided: every source in the store
            medians[site] = float(n[sample].median()) if len(sample) else 0.0
            outlier |= n > rule.outlier_factor * medians[site]
    non_special = in_split & ~special
    keep = non_special & ~outlier
    bos = (
        store.positions() == 0 if store.config.get("bos", "prepend") == "prepend" else torch.zeros_like(keep)
    )
    counts = {
        "rows_in_split": int(in_split.sum()),
        "special_excluded": int((in_split & special).sum()),
        "outliers_excluded": int((non_special & outlier).sum()),
        "ordinary_rows": int(keep.sum()),
    }
    return Rows(split, keep, in_split & ~bos, norms, medians, counts)


def first_span(rows: Rows, n: int) -> tuple[Tensor, Tensor]:
    """(ordinary, all-but-BOS) masks cut at the n-th ordinary row: both FVUs over one span of text."""
    idx = torch.nonzero(rows.keep).squeeze(-1)
    end = int(idx[min(n, len(idx)) - 1]) + 1 if len(idx) else 0
    span = torch.arange(len(rows.keep)) < end
    return rows.keep & span, rows.all_but_bos & span


@torch.no_grad()
def center(
    store: ActivationStore, site: str, keep: Tensor, scale: float, method: str, max_rows: int = MEDIAN_ROWS
) -> Tensor:
    """Mean or geometric median (Weiszfeld, 50 iterations) of up to `max_rows` kept rows, strided
    over the store, times `scale` (the training units): the b_dec initialisation."""
    idx = torch.nonzero(keep).squeeze(-1)
    idx = idx[:: max(1, len(idx) // max_rows)]
    x = torch.cat(
        [
            store.shard(site, j)[idx[(idx >= r.row_start) & (idx < r.row_end)] - r.row_start]
            .flatten(1)
            .float()
            for j, r in enumerate(store.records(site))
        ]
    ).double()
    point = x.mean(0)
    if method == "geometric_median":
        for _ in range(50):
            w = 1 / (x - point).norm(dim=-1).clamp(min=1e-8)
            point = (w[:, None] * x).sum(0) / w.sum()
    return (point * scale).float()
