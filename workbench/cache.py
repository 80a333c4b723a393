"""Content-addressed results cache shared by the app, batch jobs and Jupyter.

One folder per key, `entries/<key[:2]>/<key>/`, holding `config.json`, `meta.json` (provenance +
sha256 of every other file), `result.json` and `arrays.safetensors`. Entries are built in a private
temp folder and renamed into place, so a reader never sees half an entry and two processes writing
the same key both succeed (the second rename loses and its copy is dropped).

The entry folders are the truth; `index.sqlite` only lists and searches them. It is rebuilt
from the folders when it is missing or damaged (a damaged file is moved aside, never dropped),
listing adds entries it lacks (a writer killed between publishing and indexing) and drops rows
whose folder is gone, and a cache hit indexes its entry.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch loads only when arrays are read or written: listings stay fast
    import torch

from workbench import paths

log = logging.getLogger(__name__)
T = TypeVar("T")

FILES = ("config.json", "result.json", "arrays.safetensors")
# A put's temp folder lives for seconds and is flock-ed by its writer; the age only covers the
# instant between its mkdir and that flock, and keeps `trash-*` folders being deleted alone.
TMP_GRACE_S = 600
_KEY = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[0-9a-f]{1,64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, analysis TEXT, version INTEGER, model TEXT,
    config TEXT, created REAL, duration REAL, path TEXT
)"""


class CorruptEntryError(RuntimeError):
    """A cache entry whose files are missing or do not match their recorded checksums."""


class CacheKeyError(ValueError):
    """A key or key prefix that is malformed, matches nothing, or matches several entries."""


def check_key(key: str) -> str:
    """`key` if it is a cache key (64 lowercase hex characters); refused before any disk access,
    so a key can never address a path outside the cache."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise CacheKeyError(f"not a cache key: {key!r} (keys are 64 lowercase hex characters)")
    return key


@dataclass
class Entry:
    key: str
    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    result: dict[str, Any]

    def arrays(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path / "arrays.safetensors")


class ResultsCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else paths.results_dir()
        self.index_path = self.root / "index.sqlite"
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        self._index(lambda db: None)  # creates (or repairs) the index once, under the lock

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / check_key(key)[:2] / key

    # --- entries --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        *,
        config: dict[str, Any],
        meta: dict[str, Any],
        result: dict[str, Any],
        arrays: dict[str, torch.Tensor],
    ) -> Entry:
        """Write an entry atomically and index it; safe against concurrent writers of any key."""
        from safetensors.torch import save_file

        final = self.entry_dir(key)
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir()
        held = _hold(tmp)  # tells `_clean_tmp` of other processes that this folder is live
        config_text = json.dumps(config, indent=2, sort_keys=True, default=str)
        texts = {"config.json": config_text, "result.json": json.dumps(result, indent=2, default=str)}
        try:
            for name, text in texts.items():
                (tmp / name).write_text(text)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in arrays.items()}, tmp / "arrays.safetensors"
            )
            # save_file creates 0o600; give it the umask's mode like the other files (group-readable)
            os.chmod(tmp / "arrays.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
            meta = {**meta, "key": key, "checksums": {f: paths.sha256_file(tmp / f) for f in FILES}}
            texts["meta.json"] = json.dumps(meta, indent=2, sort_keys=True, default=str)
            (tmp / "meta.json").write_text(texts["meta.json"])
            self._publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(held)
        self._index(lambda db: _insert(db, self._row(key, config, meta)))
        # What was written, not `get(key)`: a writer of the same key may be swapping the folder now
        loaded = {name: json.loads(text) for name, text in texts.items()}
        return Entry(key, final, loaded["config.json"], loaded["meta.json"], loaded["result.json"])

    def _publish(self, tmp: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an earlier (possibly corrupt) copy: move it aside, then replace
            self._discard(final)
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise  # anything but "another writer got there first" is a real error

    def _discard(self, final: Path) -> None:
        trash = self.root / "tmp" / f"trash-{uuid.uuid4().hex}"
        try:
            final.rename(trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def get(self, key: str) -> Entry | None:
        """The entry for `key`, None if absent; CorruptEntryError if present but not verified
        (a file missing or differing from its sha256 in meta.json, or no checksums at all)."""
        path = self.entry_dir(key)
        if not path.exists():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            _verify(key, path, meta)
            config = json.loads((path / "config.json").read_text())
            result = json.loads((path / "result.json").read_text())
        except CorruptEntryError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptEntryError(
                f"cache entry {key[:12]} is unreadable ({err.__class__.__name__}: {err})"
            ) from err
        self._index_hit(key, config, meta)
        return Entry(key=key, path=path, config=config, meta=meta, result=result)

    def _index_hit(self, key: str, config: dict[str, Any], meta: dict[str, Any]) -> None:
        """Index a verified entry the index lacks. Best effort: a hit is served even when the
        index cannot be written (a read-only shared cache, a full disk)."""

        def add(db: sqlite3.Connection) -> None:
            if not db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone():
                _insert(db, self._row(key, config, meta))

        try:
            self._index(add)
        except (sqlite3.Error, OSError) as err:
            log.warning("results index not updated for %s: %s", key[:12], err)

    def evict(self, key: str) -> None:
        """Remove the entry for `key` (folder and index row); nothing happens if it is absent."""
        path = self.entry_dir(key)
        if path.exists():
            self._discard(path)
        self._index(lambda db: db.execute("DELETE FROM entries WHERE key = ?", (key,)))

    def resolve(self, prefix: str) -> str:
        """The one key starting with `prefix` (case-insensitive), looked up in the entry folders
        so it works whatever state the index is in; CacheKeyError if none or several match."""
        wanted = prefix.strip().lower() if isinstance(prefix, str) else ""
        if not _PREFIX.fullmatch(wanted):
            raise CacheKeyError(
                f"not a cache key or key prefix: {prefix!r} (hex characters, the start of a 64-character key)"
            )
        matches = sorted(self._entry_dirs(wanted))
        if not matches:
            raise CacheKeyError(f"no cached result matches {prefix!r}")
        if len(matches) > 1:
            shown = ", ".join(m[:12] for m in matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise CacheKeyError(
                f"{len(matches)} cached results start with {prefix!r} ({shown}); give more characters"
            )
        return matches[0]

    def list(self, analysis: str | None = None, text: str | None = None, limit: int = 500) -> list[dict]:
        """Index rows, newest first, optionally filtered by analysis name and a substring of the
        config; the index is first brought in line with the entry folders."""
        query, args = "SELECT * FROM entries WHERE 1=1", []
        if analysis:
            query += " AND analysis = ?"
            args.append(analysis)
        if text:
            query += " AND (config LIKE ? OR analysis LIKE ? OR model LIKE ?)"
            args += [f"%{text}%"] * 3
        query += " ORDER BY created DESC LIMIT ?"
        args.append(limit)

        def select(db: sqlite3.Connection) -> list[sqlite3.Row]:
            self._sync(db)
            db.row_factory = sqlite3.Row
            return db.execute(query, args).fetchall()

        return [dict(r) | {"config": json.loads(r["config"])} for r in self._index(select)]

    def reindex(self) -> int:
        """Rebuild every index row from the entry folders; the number of entries indexed."""
        return self._index(self._fill)

    # --- the index ------------------------------------------------------------------------

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Every use of the index holds an exclusive flock on `index.lock`. sqlite's own locking
        is not enough: switching a fresh file to WAL, and opening a WAL file while the last
        connection checkpoints it, answered `database is locked` without waiting for the busy
        timeout (4 processes opening a fresh cache at once: 7 failed rounds in 300). Index
        operations take milliseconds, so serialising them costs little; flock is per open file,
        so threads of one process (the app) exclude each other too, and a killed holder frees it."""
        fd = os.open(self.root / "index.lock", os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _index(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(db)` in one transaction under the lock, first creating or repairing the index."""
        with self._lock():
            if not self.index_path.exists():
                self._rebuild(damage=None)
            try:
                return self._transaction(fn)
            except sqlite3.DatabaseError as err:
                if not _is_damage(err):
                    raise
                self._rebuild(damage=err)
            return self._transaction(fn)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = sqlite3.connect(self.index_path, timeout=60)
        try:
            with db:
                return fn(db)
        finally:
            db.close()

    def _rebuild(self, damage: sqlite3.DatabaseError | None) -> None:
        """A new index filled from the entry folders; a damaged file (and its logs) is moved aside.
        Called under the lock, so no other connection is open."""
        stamp = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]  # unique: never overwrite
        for suffix in ("", "-journal", "-wal", "-shm"):  # never replay a stale log into a new file
            old = self.root / f"index.sqlite{suffix}"
            if old.exists():
                old.rename(self.root / f"index.sqlite{suffix}.damaged-{stamp}")
        db = sqlite3.connect(self.index_path, timeout=60)
        try:
            # Rollback journal, not WAL: with every access serialised by `_lock`, WAL's concurrent
            # readers are moot and creating + checkpointing its files on every connection made a
            # hit 10x slower here (get 11.4 -> 1.2 ms, list 15.9 -> 4.2 ms under load).
            db.execute("PRAGMA journal_mode=DELETE")
            with db:
                db.execute(_SCHEMA)
                n = self._fill(db)
        finally:
            db.close()
        if damage is not None or n:
            how = f"was damaged ({damage}), moved aside as *.damaged-{stamp}," if damage else "was missing,"
            log.warning("results index %s %s rebuilt from %d entries", self.index_path, how, n)

    def _fill(self, db: sqlite3.Connection) -> int:
        db.execute("DELETE FROM entries")
        return sum(self._add_from_disk(db, key, path) for key, path in self._entry_dirs().items())

    def _sync(self, db: sqlite3.Connection) -> None:
        """Index entry folders the index lacks; drop rows whose folder is gone."""
        on_disk = self._entry_dirs()
        indexed = {key for (key,) in db.execute("SELECT key FROM entries")}
        for key in on_disk.keys() - indexed:
            self._add_from_disk(db, key, on_disk[key])
        db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in indexed - on_disk.keys()])

    def _add_from_disk(self, db: sqlite3.Connection, key: str, path: Path) -> bool:
        """Index one entry from its meta.json and config.json (checksums are checked on `get`)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            config = json.loads((path / "config.json").read_text())
            _insert(db, self._row(key, config, meta))
        except (OSError, ValueError, AttributeError, TypeError) as err:
            log.warning("cache entry %s not indexed: %s", key[:12], err)
            return False
        return True

    def _entry_dirs(self, prefix: str = "") -> dict[str, Path]:
        """Key -> folder of every entry folder whose key starts with `prefix`."""
        found = {}
        for shard in _scandir(self.root / "entries"):
            if shard.is_dir() and shard.name.startswith(prefix[:2]):
                for item in _scandir(Path(shard.path)):
                    name = item.name
                    if _KEY.fullmatch(name) and name[:2] == shard.name and name.startswith(prefix):
                        found[name] = Path(item.path)
        return found

    def _row(self, key: str, config: dict[str, Any], meta: dict[str, Any]) -> tuple:
        return (
            key,
            meta.get("analysis"),
            meta.get("version"),
            meta.get("model"),
            json.dumps(config, sort_keys=True, default=str),
            meta.get("created", time.time()),
            meta.get("duration_s"),
            str(self.entry_dir(key)),
        )

    def _clean_tmp(self) -> None:
        """Remove `tmp/` leftovers of killed writers: older than TMP_GRACE_S and not held."""
        for item in _scandir(self.root / "tmp"):
            path = Path(item.path)
            try:
                if time.time() - path.lstat().st_mtime < TMP_GRACE_S:
                    continue
                if not item.is_dir(follow_symlinks=False):
                    path.unlink()
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # gone already: another process cleaned it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path, ignore_errors=True)
            except BlockingIOError:
                pass  # a live writer still holds it
            finally:
                os.close(fd)


def _hold(folder: Path) -> int:
    """An open descriptor holding an exclusive flock on `folder`, released when closed."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _verify(key: str, path: Path, meta: dict[str, Any]) -> None:
    """Raise CorruptEntryError unless meta.json names `key` and a matching sha256 for every file."""
    checksums = meta.get("checksums") or {}
    if meta.get("key", key) != key:
        raise CorruptEntryError(f"cache entry {key[:12]}: its meta.json belongs to key {meta['key']!r}")
    if not checksums:
        raise CorruptEntryError(
            f"cache entry {key[:12]}: meta.json records no checksums, so it cannot be verified"
        )
    for name in FILES:
        if name not in checksums:
            raise CorruptEntryError(
                f"cache entry {key[:12]}: meta.json records no checksum for {name}, so it cannot be verified"
            )
        if paths.sha256_file(path / name) != checksums[name]:
            raise CorruptEntryError(f"cache entry {key[:12]}: {name} does not match its checksum")


def _insert(db: sqlite3.Connection, row: tuple) -> None:
    db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?)", row)


def _is_damage(err: sqlite3.DatabaseError) -> bool:
    """A file that is not (or no longer) an index: garbage, corrupt pages, or a missing table.
    Locks, a full disk or a read-only folder are real errors and never trigger a rebuild."""
    name = getattr(err, "sqlite_errorname", "")
    return name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT") or "no such table" in str(err)


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []
