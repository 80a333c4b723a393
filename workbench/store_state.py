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
import time
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
    if root.is_dir() and not is_store(root) and not only_ours(root):
        raise StoreError(
            f"{root} is not empty and is not an activation store; choose an empty or new folder for --out"
        )


def only_ours(root: Path) -> bool:
    """The folder holds nothing, or only a capture's lock and temp files (one is starting)."""
    return all(p.name == LOCK or _LEFTOVER.fullmatch(p.name) for p in root.iterdir())


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the store's exclusive write lock (flock on `root/.lock`), waiting for another capture.

    The kernel drops a flock when its holder dies, so a killed capture never leaves a stale lock.
    A holder may remove the whole folder (a failed first capture): the waiter then holds a lock on
    a deleted file, notices that by inode, and starts over on a fresh folder."""
    while True:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd) and (holder := _holder(fd)):
            log.warning(f"store {root.name} is being written by another capture (pid {holder}); waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, root / LOCK):
            break
        os.close(fd)
    try:
        _write_pid(fd)
        yield
    finally:
        os.ftruncate(fd, 0)  # the file names a pid only while that pid holds the lock
        os.close(fd)  # releases the lock


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def _holder(fd: int) -> str | None:
    """The pid the lock's holder wrote into the file, waiting until it is there; None if the lock
    came free meanwhile (it is then ours). A capture writes its pid right after taking the lock,
    but a loaded machine can pause it in between: reading at once named "pid unknown". Holders
    that never write one (`rm-store`, a status probe) release the lock instead."""
    while True:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        if _try_lock(fd, tries=1):
            return None
        time.sleep(0.01)


def _try_lock(fd: int, tries: int = 5) -> bool:
    """Take the lock without blocking, retrying briefly: `list_stores` and `rm-store` hold it
    for microseconds to see whether a capture is running, which is no reason to announce a wait."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < tries - 1:
                time.sleep(0.02)
    return False


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


def token_shards(root: Path, records: list[ShardRecord], ctx_len: int) -> set[int]:
    """Shards whose tokens are on disk: a part file, or exactly their rows in tokens.parquet."""
    return set(_parts(root)) | set(_old_tokens(root, records, ctx_len))


def _parts(root: Path) -> dict[int, Path]:
    folder = root / "tokens"
    return {int(m[1]): p for p in folder.glob("part-*.parquet") if (m := _PART.fullmatch(p.name))}


def _old_tokens(root: Path, records: list[ShardRecord], ctx_len: int) -> dict[int, pa.Table]:
    """Per shard of `records`, its rows of tokens.parquet if they are all there, once and in
    order; a damaged file, or one that lost or doubled a shard's rows, counts as absent there."""
    try:
        table = pq.read_table(root / "tokens.parquet")
        seq, pos = table.column("seq").to_numpy(), table.column("pos").to_numpy()
    except (OSError, KeyError, pa.ArrowException):
        return {}
    order = np.argsort(seq, kind="stable")  # a sequence's rows keep their order
    ranges = {r.shard: (r.row_start, r.row_end) for r in records}
    found = {}
    for shard, (start, end) in ranges.items():
        lo, hi = np.searchsorted(seq[order], [start // ctx_len, end // ctx_len])
        rows, idx = np.arange(start, end), order[lo:hi]
        if (
            len(idx) == len(rows)
            and np.array_equal(seq[idx], rows // ctx_len)
            and np.array_equal(pos[idx], rows % ctx_len)
        ):
            found[shard] = table.take(idx)
    return found


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


def assemble_tokens(root: Path, records: list[ShardRecord], ctx_len: int) -> tuple[pa.Table, bool]:
    """The token table of every shard in `records`, from its part file, else from the old
    tokens.parquet; also whether any part was used (else tokens.parquet already is that table)."""
    parts = _parts(root)
    shards = sorted({r.shard for r in records})
    old = _old_tokens(root, records, ctx_len) if set(shards) - set(parts) else {}
    pieces = [pq.read_table(parts[k]) if k in parts else old[k] for k in shards if k in parts or k in old]
    return (pa.concat_tables(pieces) if pieces else pa.table({"seq": [], "pos": []})), bool(parts)


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
    for name in ("manifest.parquet", "tokens.parquet"):
        (root / name).unlink(missing_ok=True)
    for folder in [root / "tokens", *(root / "acts" / site_dir(s) for s in sites), root / "acts"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    (root / "run.json").unlink(missing_ok=True)  # last: the folder is a store until it is empty
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
