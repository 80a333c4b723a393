"""Activation store: capture hook activations to sharded safetensors, read them back by memory map.

Layout of one capture run (folder named by the run's content hash):
    run.json                                provenance + config + status
    tokens.parquet                          doc, seq, pos, token (one row per stored token)
    acts/<site>/shard-NNNNN.safetensors     "acts": [rows, d] or [rows, n_heads, d_head]
    manifest.parquet                        site, shard, row_start, row_end, bytes, checksum, stats
A shard is a fixed number of sequences. Each file is written to a temp name and renamed, and a
shard enters the manifest only after all its files exist, so a killed capture leaves at most
orphans that the resume deletes. Reading checks each shard's size against the manifest.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from workbench import paths
from workbench.sites import held_name
from workbench.store_index import _status, list_stores, resolve_store  # noqa: F401 - listing without torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreError(RuntimeError):
    """A store that is missing, incomplete or damaged; the message names the file and the fix."""


def site_dir(site: str) -> str:
    return site  # TL names are already safe folder names (letters, digits, dots, underscores)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class ShardRecord:
    site: str
    shard: int
    row_start: int
    row_end: int
    bytes: int
    checksum: str
    mean: float
    std: float
    norm_mean: float
    abs_max: float

    def path(self, root: Path) -> Path:
        return root / "acts" / site_dir(self.site) / shard_name(self.shard)

    def intact(self, root: Path) -> bool:
        """Present with the size the manifest recorded (cheap: a stat, no read)."""
        path = self.path(root)
        return path.exists() and path.stat().st_size == self.bytes


_MANIFEST_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("shard", pa.int64()),
        ("row_start", pa.int64()),
        ("row_end", pa.int64()),
        ("bytes", pa.int64()),
        ("checksum", pa.string()),
        *((name, pa.float64()) for name in ("mean", "std", "norm_mean", "abs_max")),
    ]
)
# Shards whose checksum this process has checked: (path, inode, mtime, size, checksum). A changed
# file, or a manifest with another checksum, is checked again.
_VERIFIED: set[tuple] = set()


def read_manifest(root: Path) -> list[ShardRecord]:
    path = root / "manifest.parquet"
    if not path.exists():
        return []
    try:
        # One open file: by path, pyarrow may open it again for the pages, and a capture that
        # renames a new manifest in between gives it the footer of one and the pages of another.
        with open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    except FileNotFoundError:
        return []
    except Exception as err:  # noqa: BLE001 - pyarrow raises several error types on damaged files
        raise StoreError(
            f"{path} is unreadable ({err}); delete it and re-run the capture to rebuild"
        ) from err
    for row in rows:
        if "sha256" in row:  # manifests written before the checksum column
            row["checksum"] = "sha256:" + row.pop("sha256")
    return [ShardRecord(**r) for r in rows]


def write_manifest(root: Path, records: Sequence[ShardRecord], run_id: str | None = None) -> None:
    """Write the manifest atomically; `run_id` goes in its schema metadata so a folder whose
    run.json was lost can still be matched to its capture."""
    table = pa.Table.from_pylist([vars(r) for r in records], schema=_MANIFEST_SCHEMA)
    if run_id:
        table = table.replace_schema_metadata({"run_id": run_id})
    tmp = paths.temp_path_for(root / "manifest.parquet")
    pq.write_table(table, tmp)
    # No fsync, as for the shards: a rename survives a killed process, and an fsync here made
    # ext4 flush the shard just written (~0.25 s a shard). Power loss is caught by the size
    # check on read and `verify()`'s checksums, and the resume rewrites what is missing.
    paths.commit_temp(tmp, root / "manifest.parquet", fsync=False)


class _Sites(list):
    """A store's canonical site names; `in` also accepts their aliases (`blocks.5.hook_out` is in a
    store of `blocks.5.hook_resid_post`), so every `site in store.sites` check takes either name."""

    def __init__(self, names: Sequence[str], aliases: dict | None):
        super().__init__(names)
        self.aliases = aliases or {}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and held_name(name, self, self.aliases) is not None


class ActivationStore:
    """Read side of a capture run: row slices by memory map and seeded shuffled batches."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "run.json").exists():
            raise StoreError(
                f"no activation store at {self.root} (run.json missing); capture one with `workbench capture`"
            )
        self.run = json.loads((self.root / "run.json").read_text())
        self.config = self.run["config"]
        self.sites: list[str] = _Sites(self.run["sites"], self.run.get("aliases"))
        if self.complete and not (self.root / "manifest.parquet").exists():
            raise StoreError(
                f"{self.root} is damaged: run.json says the capture is complete but manifest.parquet "
                "is missing; re-run the same capture command to rebuild it"
            )
        self._by_site: dict[str, list[ShardRecord]] = {s: [] for s in self.sites}
        for rec in read_manifest(self.root):
            self._by_site.setdefault(rec.site, []).append(rec)
        for recs in self._by_site.values():
            recs.sort(key=lambda r: r.shard)

    # --- identity and shape -------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.run.get("status") == "complete"

    @property
    def fingerprint(self) -> str:
        """Identity of what the store holds, used in cache keys: sha256 of the run id (model,
        weights, data, sites, policy) and every shard's checksum, so a rewritten shard whose
        bytes differ gives new keys."""
        checksums = sorted((r.site, r.shard, r.checksum) for recs in self._by_site.values() for r in recs)
        return paths.sha256_json({"run_id": self.run["run_id"], "checksums": checksums})

    @property
    def n_rows(self) -> int:
        recs = self.records(self.sites[0])
        return recs[-1].row_end if recs else 0

    def site(self, name: str) -> str:
        """The stored (canonical) name of hook `name`; an alias such as `blocks.5.hook_out` maps to
        `blocks.5.hook_resid_post` (workbench.sites.held_name)."""
        held = held_name(name, self.sites, self.sites.aliases)
        if held is None:
            raise StoreError(f"site '{name}' is not in this store; it holds: {', '.join(self.sites)}")
        return held

    def shape(self, site: str) -> list[int]:
        return self.run["shapes"][self.site(site)]

    def records(self, site: str) -> list[ShardRecord]:
        return self._by_site[self.site(site)]

    def tokens(self) -> pa.Table:
        """doc, seq, pos, token for every stored row, in row order."""
        path = self.root / "tokens.parquet"
        if path.exists():
            return pq.read_table(path)
        if self.complete:
            raise StoreError(
                f"{self.root} is damaged: tokens.parquet is missing; re-run the same capture command to rebuild it"
            )
        parts = sorted((self.root / "tokens").glob("part-*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})

    def token_ids(self) -> torch.Tensor:
        """[rows] token id of every stored row."""
        return torch.from_numpy(self.tokens().column("token").to_numpy().astype(np.int64))

    def positions(self) -> torch.Tensor:
        """[rows] position of every stored row inside its sequence (0 = BOS under the prepend policy)."""
        return torch.from_numpy(self.tokens().column("pos").to_numpy().astype(np.int64))

    # --- reading ------------------------------------------------------------------------
    def _checked_path(self, site: str, index: int) -> Path:
        """The shard's file, checked for size on every read and for its checksum on the first
        read in this process (xxh3: ~0.05 s/GB); a damaged file is set aside for the next
        capture to rewrite and never read."""
        rec = self.records(site)[index]
        path = rec.path(self.root)
        if not rec.intact(self.root):
            raise StoreError(
                f"shard {rec.shard} of site {site} is missing or truncated ({path}); "
                "re-run the same capture command to resume and rewrite it"
            )
        stat = path.stat()
        seen = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, rec.checksum)
        if seen not in _VERIFIED:
            if not _checksum_ok(path, rec.checksum):
                aside = _set_aside(path, stat)
                raise StoreError(
                    f"shard {rec.shard} of site {site} is damaged: {path} does not match its checksum"
                    f"{f' (set aside as {aside.name})' if aside else ''}; re-run the same capture command to "
                    f"rewrite it (`workbench verify {self.root}` checks every shard)"
                )
            _VERIFIED.add(seen)
        return path

    def shard(self, site: str, index: int) -> torch.Tensor:
        """One whole shard of a site (checked against the manifest's size)."""
        path = self._checked_path(site, index)
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor("acts")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise StoreError(f"shard {path} is damaged ({err}); re-run the capture to rewrite it") from err

    def n_shards(self, site: str) -> int:
        return len(self.records(site))

    def read(self, site: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a site, touching only the shards that hold them."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        pieces = []
        for i, rec in enumerate(self.records(site)):
            lo, hi = max(start, rec.row_start), min(stop, rec.row_end)
            if lo < hi:
                pieces.append(self._slice(site, i, lo - rec.row_start, hi - rec.row_start))
        if not pieces:
            return torch.empty(0, *self.shape(site))
        return torch.cat(pieces)

    def _slice(self, site: str, index: int, lo: int, hi: int) -> torch.Tensor:
        with safe_open(self._checked_path(site, index), framework="pt") as f:
            return f.get_slice("acts")[lo:hi]

    def iter_shards(self, site: str) -> Iterator[torch.Tensor]:
        for i in range(self.n_shards(site)):
            yield self.shard(site, i)

    def batches(
        self, site: str, batch_size: int, *, seed: int = 0, buffer_shards: int = 4, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """Seeded shuffled stream of row batches: shard order permuted, rows mixed in a bounded buffer."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_shards(site), generator=gen).tolist()
        for i in range(0, len(order), buffer_shards):
            buf = torch.cat([self.shard(site, j) for j in order[i : i + buffer_shards]])
            buf = buf[torch.randperm(len(buf), generator=gen)]
            for b in range(0, len(buf), batch_size):
                batch = buf[b : b + batch_size]
                if drop_last and len(batch) < batch_size:
                    break
                yield batch

    def verify(self) -> list[str]:
        """Full check: every shard's checksum against the manifest. Returns the problems found."""
        problems = []
        for site in self.sites:
            for rec in self.records(site):
                path = rec.path(self.root)
                if not path.exists() or not _checksum_ok(path, rec.checksum):
                    _set_aside(path, None)  # the next run of the capture rewrites it
                    problems.append(f"{site} shard {rec.shard}")
        return problems

    def __repr__(self) -> str:
        return f"ActivationStore({self.root.name[:12]}, model={self.config['model']}, rows={self.n_rows}, sites={len(self.sites)})"


def _checksum_ok(path: Path, checksum: str) -> bool:
    """Hash the file through a memory map: 0.15 s/GB here against 0.18-0.23 s/GB in 1 MiB reads
    (xxh3 itself is ~0.05 s/GB; the rest is bringing the pages in, which the read then reuses)."""
    algorithm, _, digest = checksum.partition(":")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return paths.new_digest(algorithm).hexdigest() == digest
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return paths.new_digest(algorithm, view).hexdigest() == digest
    except FileNotFoundError:
        return False


def _set_aside(path: Path, stat: os.stat_result | None) -> Path | None:
    """Rename a damaged shard to `.<name>.damaged` beside it, so a size check misses it and the
    next capture rewrites it (the bytes stay for inspection). Best effort: a read-only store, or
    a file replaced since it was checked, stays where it is."""
    aside = path.with_name(f".{path.name}.damaged")
    try:
        now = path.stat()
        if stat is not None and (now.st_ino, now.st_mtime_ns) != (stat.st_ino, stat.st_mtime_ns):
            return None
        path.rename(aside)
        return aside
    except OSError:
        return None
