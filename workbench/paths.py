"""Where the workbench keeps its files, and small atomic-write helpers shared by store and cache."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


def home() -> Path:
    """Root of all workbench state: `$WORKBENCH_HOME`, else `~/.cache/workbench`."""
    root = Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    return home() / "models"


def stores_dir() -> Path:
    return home() / "stores"


def results_dir() -> Path:
    return home() / "results"


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str, chunk: int = 1 << 20) -> str:
    digest = new_digest(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_digest(algorithm: str, data: bytes = b""):
    """A hashlib-style digest; also `xxh3_128`, a fast non-cryptographic hash for bulk data."""
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128(data)
    return hashlib.new(algorithm, data)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a torn file.

    `fsync=False` still survives a killed process (rename is atomic); fsync adds power-loss safety.
    """
    fd, tmp = new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def temp_path_for(path: Path) -> Path:
    """A sibling temp name for writers (safetensors, parquet) that need a path, not bytes."""
    fd, tmp = new_temp(path)
    os.close(fd)
    return tmp


def new_temp(path: Path) -> tuple[int, Path]:
    """Create `.<name>.<random>.tmp` beside `path`; returns (open fd, temp path).

    Unlike `tempfile.mkstemp` (always 0o600) the file gets the umask's mode (0o644 / 0o664), so
    the renamed result is readable by the group like any file the user writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def commit_temp(tmp: Path, path: Path, fsync: bool = True) -> None:
    """Rename a finished temp file into place; see `atomic_write_bytes` for what fsync adds."""
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
