"""The store listing and store names, without torch: `workbench stores` and Home stay fast.

(Moved out of store.py, which imports torch, numpy and pyarrow for reading shards.)
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from workbench import paths


def resolve_store(name: str | Path) -> Path:
    """A store folder given as a path, or as the id `workbench stores` lists (a unique prefix)."""
    path = Path(name)
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    matches = sorted(paths.stores_dir().glob(f"{name}*/run.json"))
    return matches[0].parent if len(matches) == 1 else path


def _status(root: Path, status: str | None) -> str | None:
    """'running' only while a capture holds the store's lock; a killed one is 'partial' (resumable
    by re-running the same command)."""
    if status != "running":
        return status
    try:
        fd = os.open(root / ".lock", os.O_RDONLY)
    except OSError:
        return "partial"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return "partial"
    except BlockingIOError:
        return "running"
    finally:
        os.close(fd)


def list_stores(root: Path | None = None) -> list[dict]:
    """Provenance summary of every store under `$WORKBENCH_HOME/stores`, newest first."""
    root = root or paths.stores_dir()
    rows = []
    for run_json in root.glob("*/run.json"):
        try:
            run = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        size = sum(p.stat().st_size for p in run_json.parent.rglob("*") if p.is_file())
        rows.append(
            {
                "path": str(run_json.parent),
                "model": run["config"]["model"],
                "data": Path(run["config"]["data"]).name,
                "sites": len(run["sites"]),
                "rows": run.get("n_rows", 0),
                "status": _status(run_json.parent, run.get("status")),
                "size_mb": round(size / 2**20, 1),
                "created": run.get("created", 0),
            }
        )
    return sorted(rows, key=lambda r: -r["created"])
