"""Content-addressed results cache shared by the app, batch jobs and Jupyter.

One folder per key holding `config.json`, `meta.json` (provenance + sha256 of every other file),
`result.json` and `arrays.safetensors`. Entries are built in a private temp folder and renamed into
place, so a reader never sees half an entry and two processes writing the same key both succeed
(the second rename loses and its copy is dropped). An sqlite index in WAL mode lists entries.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when arrays are read or written: listings stay fast
    import torch

from workbench import paths

FILES = ("config.json", "result.json", "arrays.safetensors")


class CorruptEntryError(RuntimeError):
    """A cache entry whose files are missing or do not match their recorded checksums."""


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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, analysis TEXT, version INTEGER, model TEXT,
    config TEXT, created REAL, duration REAL, path TEXT
)"""


class ResultsCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else paths.results_dir()
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / key

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

        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir()
        try:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            (tmp / "result.json").write_text(json.dumps(result, indent=2, default=str))
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in arrays.items()}, tmp / "arrays.safetensors"
            )
            meta = {**meta, "key": key, "checksums": {f: paths.sha256_file(tmp / f) for f in FILES}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            self._publish(tmp, self.entry_dir(key))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._index(key, config, meta)
        return self.get(key)

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

    def _index(self, key: str, config: dict[str, Any], meta: dict[str, Any]) -> None:
        row = (
            key,
            meta.get("analysis"),
            meta.get("version"),
            meta.get("model"),
            json.dumps(config, sort_keys=True, default=str),
            meta.get("created", time.time()),
            meta.get("duration_s"),
            str(self.entry_dir(key)),
        )
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?)", row)

    def get(self, key: str) -> Entry | None:
        """The entry for `key`, None if absent; CorruptEntryError if present but damaged."""
        path = self.entry_dir(key)
        if not path.exists():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            for name, digest in meta["checksums"].items():
                if paths.sha256_file(path / name) != digest:
                    raise CorruptEntryError(f"cache entry {key[:12]}: {name} does not match its checksum")
            config = json.loads((path / "config.json").read_text())
            result = json.loads((path / "result.json").read_text())
        except CorruptEntryError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise CorruptEntryError(
                f"cache entry {key[:12]} is unreadable ({err.__class__.__name__}: {err})"
            ) from err
        return Entry(key=key, path=path, config=config, meta=meta, result=result)

    def evict(self, key: str) -> None:
        path = self.entry_dir(key)
        if path.exists():
            self._discard(path)
        with self._db() as db:
            db.execute("DELETE FROM entries WHERE key = ?", (key,))

    def list(self, analysis: str | None = None, text: str | None = None, limit: int = 500) -> list[dict]:
        """Index rows, newest first, optionally filtered by analysis name and a substring of the config."""
        query, args = "SELECT * FROM entries WHERE 1=1", []
        if analysis:
            query += " AND analysis = ?"
            args.append(analysis)
        if text:
            query += " AND (config LIKE ? OR analysis LIKE ? OR model LIKE ?)"
            args += [f"%{text}%"] * 3
        query += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(query, args).fetchall()
        return [dict(r) | {"config": json.loads(r["config"])} for r in rows]
