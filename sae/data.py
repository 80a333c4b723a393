"""Seeded, resumable, shuffled training batches from the activation store (no model in the loop).

Same scheme as `ActivationStore.batches` (shard order permuted, rows mixed in a bounded buffer of
whole shards), extended for training:
  * several sites read with one row permutation, concatenated on the last axis (transcoders
    train on `[mlp.hook_in, hook_mlp_out]` rows of the same tokens);
  * only the rows of a `keep` mask are streamed (`rows.select_rows`: the training split's
    ordinary tokens, i.e. no BOS/special token and no massive-norm outlier);
  * endless epochs, each with its own seeded permutation;
  * `start` skips to any batch index without reading the skipped shards (only the generator is
    advanced), so a resumed run sees exactly the batches an uninterrupted one would.
A buffer holds at least `buffer_batches` batches; its remainder (< one batch) is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.store import ActivationStore


@dataclass
class _Group:
    shards: list[int]
    n_rows: int  # kept rows


class StoreStream:
    """Iterator of float32 [batch_size, Σ d_site] batches of the rows in `keep` ([n_rows] bool; default:
    every row but BOS); `position` is the next batch index."""

    def __init__(
        self,
        store: ActivationStore,
        sites: list[str],
        batch_size: int,
        seed: int = 0,
        keep: Tensor | None = None,
        scales: list[float] | None = None,
        buffer_batches: int = 16,
        start: int = 0,
    ):
        self.store, self.sites, self.batch_size, self.seed = store, sites, batch_size, seed
        self.scales = scales or [1.0] * len(sites)
        self.keep = default_keep(store) if keep is None else keep
        self.buffer_rows = buffer_batches * batch_size
        self.records = store.records(sites[0])
        for site in sites[1:]:
            if [(r.row_start, r.row_end) for r in store.records(site)] != [
                (r.row_start, r.row_end) for r in self.records
            ]:
                raise ValueError(f"sites {sites[0]} and {site} are not aligned row for row in {store.root}")
        if self.kept_rows() < batch_size:
            raise ValueError(
                f"the store holds {self.kept_rows()} usable rows, fewer than one batch of {batch_size}"
            )
        self.position = start
        self._it = self._iterate(start)

    # --- row bookkeeping ---------------------------------------------------------------
    def keep_mask(self, shard: int) -> Tensor:
        rec = self.records[shard]
        return self.keep[rec.row_start : rec.row_end]

    def kept_rows(self) -> int:
        return sum(int(self.keep_mask(i).sum()) for i in range(len(self.records)))

    def _groups(self, order: list[int]) -> list[_Group]:
        groups, cur, n = [], [], 0
        for j in order:
            cur.append(j)
            n += int(self.keep_mask(j).sum())
            if n >= self.buffer_rows:
                groups.append(_Group(cur, n))
                cur, n = [], 0
        if cur:
            groups.append(_Group(cur, n))
        return groups

    def batches_per_epoch(self) -> int:
        return sum(g.n_rows // self.batch_size for g in self._groups(list(range(len(self.records)))))

    # --- iteration ----------------------------------------------------------------------
    def _load(self, group: _Group) -> Tensor:
        parts = []
        for j in group.shards:
            keep = self.keep_mask(j)
            cols = [
                self.store.shard(s, j)[keep].flatten(1).float() * f for s, f in zip(self.sites, self.scales)
            ]
            parts.append(torch.cat(cols, dim=-1))
        return torch.cat(parts)

    def _iterate(self, start: int) -> Iterator[Tensor]:
        index, epoch = 0, 0
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.records), generator=gen).tolist()
            for group in self._groups(order):
                perm = torch.randperm(group.n_rows, generator=gen)  # advanced even when skipped
                n_batches = group.n_rows // self.batch_size
                if index + n_batches <= start:
                    index += n_batches
                    continue
                buf = self._load(group)[perm]
                for b in range(n_batches):
                    if index >= start:
                        yield buf[b * self.batch_size : (b + 1) * self.batch_size]
                    index += 1
            epoch += 1

    def __iter__(self) -> StoreStream:
        return self

    def __next__(self) -> Tensor:
        batch = next(self._it)
        self.position += 1
        return batch


def default_keep(store: ActivationStore) -> Tensor:
    """[n_rows] bool: every row but position 0 under the prepend BOS policy (the attention sink)."""
    pos = store.positions()
    return (
        pos != 0
        if store.config.get("bos", "prepend") == "prepend"
        else torch.ones_like(pos, dtype=torch.bool)
    )


def mean_norm(store: ActivationStore, site: str, keep: Tensor, max_rows: int = 65536) -> float:
    """Mean L2 norm of a site's kept rows, over up to `max_rows` of them."""
    total, n = 0.0, 0
    for j, rec in enumerate(store.records(site)):
        x = store.shard(site, j)[keep[rec.row_start : rec.row_end]].flatten(1).float()
        total += x.norm(dim=-1).double().sum().item()
        n += len(x)
        if n >= max_rows:
            break
    return total / max(n, 1)


def sample_rows(store: ActivationStore, sites: list[str], n_rows: int, keep: Tensor) -> list[Tensor]:
    """The first `n_rows` kept rows of each site (float32), for evaluation."""
    out: list[list[Tensor]] = [[] for _ in sites]
    n = 0
    for j, rec in enumerate(store.records(sites[0])):
        mask = keep[rec.row_start : rec.row_end]
        if not mask.any():
            continue
        for i, site in enumerate(sites):
            out[i].append(store.shard(site, j)[mask].flatten(1).float())
        n += int(mask.sum())
        if n >= n_rows:
            break
    return [torch.cat(parts)[:n_rows] if parts else torch.zeros(0) for parts in out]
