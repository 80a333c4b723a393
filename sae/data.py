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


class FollowStream:
    """One pass of float32 [batch_size, Σ d_site] batches over a capture IN PROGRESS (train while capturing).

    Reads only shards the manifest has committed (a shard's files are renamed into place before
    its manifest row is written, and each is size- and checksum-checked on read: never a torn
    shard) and waits `poll_s` between looks when it has consumed every committed shard, until
    run.json says the capture is complete; then the last full batch ends the pass (the
    remainder, < one batch, is dropped).

    Shuffle: NOT a global shuffle (future shards do not exist yet). Shards are taken in index
    order in groups of at least `buffer_batches` batches of kept rows; the rows of a group, plus
    the carry-over (< one batch) of the group before, are permuted with a seeded generator. A
    group waits for all its shards, so the batches are a function of the store and the seed alone,
    not of how fast the capture ran: the same batches during the capture as after it, and a
    resumed run (`start`) skips exactly the batches already trained on. Kept rows: position > 0
    under the prepend BOS policy, minus rows whose token is in `special_ids`.
    """

    def __init__(
        self,
        root,
        sites: list[str],
        batch_size: int,
        seed: int = 0,
        special_ids: list[int] | tuple[int, ...] = (),
        scales: list[float] | None = None,
        buffer_batches: int = 16,
        start: int = 0,
        poll_s: float = 0.2,
        on_wait=None,
    ):
        from pathlib import Path

        self.root, self.sites, self.batch_size, self.seed = Path(root), sites, batch_size, seed
        ActivationStore(self.root)  # a folder that is no capture (yet) fails here, not by waiting forever
        self.special = torch.tensor(sorted(special_ids), dtype=torch.int64)
        self.scales = scales or [1.0] * len(sites)
        self.buffer_rows = buffer_batches * batch_size
        self.poll_s, self.on_wait = poll_s, on_wait
        self.shards_read: list[int] = []  # in the order consumed (tests, progress)
        self._all_tokens: Tensor | None = None
        self.n_batches = 0  # batches in the whole pass, known once it has ended
        self.position = start
        self._it = self._iterate(start)

    def __iter__(self) -> FollowStream:
        return self

    def __next__(self) -> Tensor:
        batch = next(self._it)
        self.position += 1
        return batch

    # --- committed shards ----------------------------------------------------------------
    def _committed(self, shard: int) -> tuple[ActivationStore | None, bool]:
        """(a store view whose manifest holds `shard` at every site, or None; whether the capture
        has finished). Status is read BEFORE the manifest, so 'complete' + no shard = the end."""
        import json

        from workbench.store import read_manifest

        run = json.loads((self.root / "run.json").read_text())
        complete = run.get("status") == "complete"
        have = {(r.site, r.shard) for r in read_manifest(self.root)}
        if all((site, shard) in have for site in self.sites):
            return ActivationStore(self.root), complete
        return None, complete

    def _next_shard(self, shard: int) -> ActivationStore | None:
        """Wait until `shard` is committed (a view of the store), or None when the capture ended without it."""
        import time

        while True:
            store, complete = self._committed(shard)
            if store is not None or complete:
                return store
            if self.on_wait:
                self.on_wait(shard)
            time.sleep(self.poll_s)

    def _rows(self, store: ActivationStore, shard: int) -> Tensor:
        """The kept rows of one committed shard, sites concatenated, scaled."""
        rec = store.records(self.sites[0])[shard]
        keep = self._keep(store, shard, rec.row_start, rec.row_end)
        cols = [store.shard(s, shard)[keep].flatten(1).float() * f for s, f in zip(self.sites, self.scales)]
        self.shards_read.append(shard)
        return torch.cat(cols, dim=-1)

    def _keep(self, store: ActivationStore, shard: int, lo: int, hi: int) -> Tensor:
        ctx_len = int(store.config["ctx_len"])
        pos = torch.arange(lo, hi) % ctx_len  # shards hold whole sequences
        keep = (
            pos != 0
            if store.config.get("bos", "prepend") == "prepend"
            else torch.ones(hi - lo, dtype=torch.bool)
        )
        if len(self.special):
            keep &= ~torch.isin(self._tokens(store, shard, lo, hi), self.special)
        return keep

    def _tokens(self, store: ActivationStore, shard: int, lo: int, hi: int) -> Tensor:
        """Token ids of rows [lo, hi): the shard's token part while the capture runs, tokens.parquet
        once it is complete (the parts are removed then; read once)."""
        import numpy as np
        import pyarrow.parquet as pq

        if self._all_tokens is None:
            part = self.root / "tokens" / f"part-{shard:05d}.parquet"
            try:
                ids = pq.read_table(part, columns=["token"]).column("token").to_numpy()
                return torch.from_numpy(ids.astype(np.int64))
            except FileNotFoundError:  # completed meanwhile: run.json says so before the parts go
                self._all_tokens = ActivationStore(self.root).token_ids()
        return self._all_tokens[lo:hi]

    # --- iteration -----------------------------------------------------------------------
    def _iterate(self, start: int) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003)
        carry, index, shard, ended = torch.zeros(0), 0, 0, False
        while not ended:
            parts, n = [carry] if len(carry) else [], len(carry)
            while n < self.buffer_rows:
                store = self._next_shard(shard)
                if store is None:
                    ended = True
                    break
                parts.append(self._rows(store, shard))
                n += len(parts[-1])
                shard += 1
            if not parts:
                break
            buf = torch.cat(parts)
            buf = buf[torch.randperm(len(buf), generator=gen)]
            n_batches = len(buf) // self.batch_size
            for b in range(n_batches):
                if index >= start:
                    yield buf[b * self.batch_size : (b + 1) * self.batch_size]
                index += 1
            carry = buf[n_batches * self.batch_size :]
        self.n_batches = index
