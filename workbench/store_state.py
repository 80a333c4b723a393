"""What a store folder holds on disk and who may write it: the one-writer lock, the shards that
survived, the store's own leftovers, and the checks made before a store is called complete.

Only names the store itself creates are ever deleted here: `run.json`, `manifest.parquet`,
`tokens.parquet`, `tokens/part-NNNNN.parquet`, `acts/<site>/shard-NNNNN.safetensors`, their
`.<name>.<random>.tmp` temp files, set-aside `.shard-NNNNN.safetensors.damaged` copies and `.lock`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from workbench.store import ShardRecord, StoreError, read_manifest, site_dir

log = logging.getLogger("workbench.capture")
LOCK = ".lock"
_SHARD = re.compile(r"shard-(\d{5})\.safetensors")
_PART = re.compile(r"part-(\d{5})\.parquet")
_LEFTOVER = re.compile(  # temp files of our writers (paths.new_temp names) and set-aside shards
    r"\.(run\.json|manifest\.parquet|tokens\.parquet|part-\d{5}\.parquet|shard-\d{5}\.safetensors)"
    r"\.(\w+\.tmp|damaged)"
)


def is_store(root: Path) -> bool:
    """A capture wrote here: its provenance or its manifest exists (run.json may have been lost)."""
    return (root / "run.json").exists() or (root / "manifest.parquet").exists()


def manifest_run_id(root: Path) -> str | None:
    """The run id a manifest was written for (None: no manifest, or one from before it was kept)."""
    try:
        meta = pq.read_schema(root / "manifest.parquet").metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = meta.get(b"run_id")
    return value.decode() if value else None


def check_out_folder(root: Path) -> None:
    """Refuse an `--out` that holds someone else's files: the store cleans up after itself there."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a folder; choose an empty or new folder for --out")
    if root.is_dir() and not is_store(root) and any(p.name != LOCK for p in root.iterdir()):
        raise StoreError(
            f"{root} is not empty and is not an activation store; choose an empty or new folder for --out"
        )


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the store's exclusive write lock (flock on `root/.lock`), waiting for another capture.

    The kernel drops a flock when its holder dies, so a killed capture never leaves a stale lock.
    A holder may remove the whole folder (a failed first capture): the waiter then holds a lock on
    a deleted file, notices that by inode, and starts over on a fresh folder."""
    while True:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            log.warning(f"store {root.name} is being written by another capture (pid {holder}); waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, root / LOCK):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def good_records(root: Path, sites: list[str]) -> list[ShardRecord]:
    """Manifest rows of every shard that is recorded for all sites and intact on disk (a stat)."""
    by_shard: dict[int, list[ShardRecord]] = {}
    for rec in read_manifest(root):
        by_shard.setdefault(rec.shard, []).append(rec)
    return [
        r
        for recs in by_shard.values()
        if sorted(r.site for r in recs) == sorted(sites) and all(r.intact(root) for r in recs)
        for r in recs
    ]


def token_shards(root: Path, shard_seqs: int) -> set[int]:
    """Shards whose tokens are on disk: a part file, or rows of tokens.parquet."""
    have = {int(m[1]) for p in (root / "tokens").glob("part-*.parquet") if (m := _PART.fullmatch(p.name))}
    path = root / "tokens.parquet"
    if path.exists():
        try:
            seqs = pq.read_table(path, columns=["seq"]).column("seq").to_numpy()
            have |= set(np.unique(seqs // shard_seqs).tolist())
        except Exception:  # noqa: BLE001 - a damaged tokens.parquet counts as absent; it is rewritten
            pass
    return have


def remove_orphans(root: Path, sites: list[str], keep: set[int]) -> None:
    """Delete the store's temp files, set-aside damaged copies, and shard and token files of
    shards outside `keep` (written by a killed run but never committed)."""
    for folder in [root, root / "tokens", *(root / "acts" / site_dir(s) for s in sites)]:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = path.name
            if _LEFTOVER.fullmatch(name):
                path.unlink(missing_ok=True)
            elif (m := _SHARD.fullmatch(name) or _PART.fullmatch(name)) and folder != root:
                if int(m[1]) not in keep:
                    path.unlink(missing_ok=True)


def assemble_tokens(root: Path, n_shards: int, shard_seqs: int) -> tuple[pa.Table, bool]:
    """The token table of shards 0..n_shards-1 from part files, else from the old tokens.parquet;
    also whether any part was used (else tokens.parquet is already the whole table)."""
    old = root / "tokens.parquet"
    table = pq.read_table(old) if old.exists() else None
    pieces, used_parts = [], False
    for shard in range(n_shards):
        part = root / "tokens" / f"part-{shard:05d}.parquet"
        if part.exists():
            pieces.append(pq.read_table(part))
            used_parts = True
        elif table is not None:
            seq = table.column("seq").to_numpy() // shard_seqs
            pieces.append(table.filter(pa.array(seq == shard)))
    return (pa.concat_tables(pieces) if pieces else pa.table({})), used_parts


def check_tokens(root: Path, table: pa.Table, n_rows: int, ctx_len: int) -> None:
    """Every stored row has its token, once and in order: seq = row // ctx_len, pos = row % ctx_len."""
    rows = np.arange(n_rows)
    ok = table.num_rows == n_rows and n_rows > 0
    ok = ok and np.array_equal(table.column("seq").to_numpy(), rows // ctx_len)
    ok = ok and np.array_equal(table.column("pos").to_numpy(), rows % ctx_len)
    if not ok:
        raise StoreError(
            f"the tokens of {root} cover {table.num_rows} rows out of order or incompletely, but its "
            f"shards hold {n_rows}; the store was not marked complete: re-run the same capture command"
        )


def healthy(root: Path, run: dict) -> bool:
    """Cheap check of a complete store (stats, no reads of shard data): every shard of every
    site present with its recorded size, nothing set aside as damaged, all tokens present."""
    try:
        records = good_records(root, run["sites"])
        meta = pq.read_metadata(root / "tokens.parquet")
    except (OSError, StoreError, pa.ArrowException):
        return False
    shards = {r.shard for r in records}
    n_rows = max((r.row_end for r in records), default=0)
    damaged = any((root / "acts").glob("*/.shard-*.damaged"))
    return (
        bool(shards)
        and shards == set(range(len(shards)))
        and len(records) == len(read_manifest(root))
        and n_rows == run.get("n_rows")
        and meta.num_rows == n_rows
        and not damaged
    )


def remove_new_store(root: Path, sites: list[str], whole_folder: bool) -> None:
    """After a failed capture that committed nothing: delete what it created (the folder itself
    if it made it), so no empty "running" store is listed. Holds the lock while it runs."""
    try:
        if read_manifest(root):
            return
    except StoreError:
        return
    remove_orphans(root, sites, keep=set())
    for name in ("manifest.parquet", "run.json", "tokens.parquet"):
        (root / name).unlink(missing_ok=True)
    for folder in [root / "tokens", *(root / "acts" / site_dir(s) for s in sites), root / "acts"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    (root / LOCK).unlink(missing_ok=True)  # a waiter on it notices (inode) and starts over
    if whole_folder and not any(root.iterdir()):
        root.rmdir()


def remove_token_parts(root: Path) -> None:
    """Delete tokens/part-*.parquet (and their temp files) once tokens.parquet holds them all."""
    folder = root / "tokens"
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _PART.fullmatch(path.name) or _LEFTOVER.fullmatch(path.name):
            path.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def row_shape(path: Path) -> list[int]:
    """Shape of one row of a shard file (its header only)."""
    with safe_open(path, framework="pt") as f:
        return list(f.get_slice("acts").get_shape()[1:])
