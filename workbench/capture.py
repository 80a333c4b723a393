"""Write side of the activation store: bounded-memory, shard-atomic, resumable capture.

Compute and disk overlap: while the model runs shard k, a writer thread serialises shard k-1.
At most two shards of activations are alive at once, so memory is flat in the token budget.
"""

from __future__ import annotations

import errno
import itertools
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from workbench import data, paths, sites, store_state
from workbench.capture_config import DEFAULT_SITES, CaptureConfig  # noqa: F401 - re-exported
from workbench.shard_files import aligned_empty, write_safetensors
from workbench.store import (
    DTYPES,
    ActivationStore,
    ShardRecord,
    StoreError,
    shard_name,
    site_dir,
    write_manifest,
)
from workbench.store_state import log


class _AllSitesCaptured(StopAtLayerException):
    """Raised by the capture hook once every site of the batch is stored."""


_HOOK_LEVEL = -7001  # tags the capture's hooks so removing them leaves everyone else's alone
Progress = Callable[[int, int], None]


def run_identity(cfg: CaptureConfig, model, resolved: list[str]) -> dict:
    return {
        "model": model.workbench.identity(),
        "sites": resolved,
        "data": data.fingerprint(cfg.data),
        **{k: v for k, v in asdict(cfg).items() if k not in ("model", "sites", "data", "processing")},
    }


def capture(
    cfg: CaptureConfig,
    model=None,
    out: str | Path | None = None,
    progress: bool | Progress = True,
) -> ActivationStore:
    """Capture `cfg.sites` over `cfg.data`; resume a partial run of the same identity, repair a
    complete one whose shards are missing, truncated or set aside as damaged, or wait while
    another capture writes the same store (one writer at a time)."""
    if out is not None:
        store_state.check_out_folder(Path(out))  # before the model loads
    if model is None:
        from workbench.models import load_model

        model = load_model(cfg.model, cfg.processing)
    resolved = sites.resolve_for_model(cfg.sites, model)  # fails before any compute
    identity = run_identity(cfg, model, resolved)
    run_id = paths.sha256_json(identity)
    root = Path(out) if out else paths.stores_dir() / run_id[:16]
    existed = root.exists()
    with store_state.writer_lock(root):
        created = not store_state.is_store(root) and store_state.only_ours(root)
        run = _open_run(root, cfg, identity, run_id, resolved, sites.recorded_aliases(model, resolved))
        if run["status"] == "complete":
            if store_state.healthy(root, run):
                return ActivationStore(root)
            log.warning(f"store {root.name} is damaged; rewriting its missing or damaged shards")
            run["status"] = "running"  # honest while repairing; complete again when _finish checks it
            paths.atomic_write_json(root / "run.json", run)
        try:
            _Capture(cfg, model, root, run, progress).go()
        except BaseException as err:
            if created:  # nothing of ours is worth keeping unless a shard was committed
                store_state.remove_new_store(root, resolved, whole_folder=not existed)
            if _disk_full(err):
                raise StoreError(
                    f"disk full while writing {err.filename or root}: free space and re-run the same "
                    "command to resume"
                ) from err
            raise
    return ActivationStore(root)


def _disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT from os.write, or pyarrow's OSError that carries only the text."""
    if not isinstance(err, OSError):
        return False
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)


def _open_run(
    root: Path,
    cfg: CaptureConfig,
    identity: dict,
    run_id: str,
    resolved: list[str],
    aliases: dict | None = None,
) -> dict:
    """The run's provenance: read back, or (new store, or run.json lost) written as running."""
    run_json = root / "run.json"
    if run_json.exists():
        try:
            run = json.loads(run_json.read_text())
        except ValueError as err:
            raise StoreError(
                f"{run_json} is unreadable ({err}); delete it and re-run the same capture command"
            ) from err
        if run.get("run_id") != run_id:
            raise StoreError(
                f"{root} holds a different capture (run {str(run.get('run_id', '?'))[:12]}); choose another --out"
            )
        return run
    if store_state.is_store(root) and store_state.manifest_run_id(root) != run_id:
        # A manifest from before it named its run is trusted only in the folder named by the run.
        if store_state.manifest_run_id(root) is not None or root.name != run_id[:16]:
            raise StoreError(
                f"{root} holds a different capture (its run.json is missing); choose another --out"
            )
    run = {
        "run_id": run_id,
        "status": "running",
        "config": {**asdict(cfg), "sites": list(cfg.sites)},
        "identity": identity,
        "sites": resolved,
        "aliases": aliases or {},  # other names of the stored sites, so reads accept them
        "shapes": {},
        "created": time.time(),
        "versions": _versions(),
    }
    paths.atomic_write_json(run_json, run)
    return run


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "transformer-lens", "safetensors")}


class _Capture:
    def __init__(self, cfg: CaptureConfig, model, root: Path, run: dict, progress: bool | Progress):
        self.cfg, self.model, self.root, self.run = cfg, model, root, run
        self.sites: list[str] = run["sites"]
        self.dtype = DTYPES[cfg.dtype]
        self.records = store_state.good_records(root, self.sites)
        self.done = {r.shard for r in self.records}
        # Written buffers are reused (by row shape): a fresh allocation costs a page fault per
        # 4 KB on first touch, which on a VM took as long as copying the activations in.
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._row_shapes: dict[str, list[int]] = {}
        self.total_seqs = cfg.n_tokens // cfg.ctx_len
        self.callback = progress if callable(progress) else None
        # counted here, not read off the bar: a disabled tqdm (the app's callback) never counts
        self.tokens_done = min(len(self.done) * cfg.shard_seqs, self.total_seqs) * cfg.ctx_len
        self.bar = tqdm(
            total=self.total_seqs * cfg.ctx_len,
            initial=self.tokens_done,
            unit="tok",
            unit_scale=True,
            desc="capture",
            disable=progress is False or self.callback is not None,
        )

    def go(self) -> None:
        """Forward shard after shard. A site's file is queued for the writer thread as soon as
        the shard's last batch passes its hook, so the writes overlap the rest of the forward pass
        (even in the last shard); the shard is committed once all its files are written."""
        has_tokens = store_state.token_shards(self.root, self.records, self.cfg.ctx_len)
        store_state.remove_orphans(self.root, self.sites, self.done)
        self._write_manifest()  # drop rows of shards that did not survive
        seqs = data.pack(self.cfg.data, self.model.tokenizer, self.cfg.ctx_len, self.cfg.bos)
        seqs = itertools.islice(seqs, self.total_seqs)  # packing is deterministic: shard k is known
        chunks = iter(lambda: list(itertools.islice(seqs, self.cfg.shard_seqs)), [])
        pending: Future | None = None
        n_shards = 0
        with ThreadPoolExecutor(max_workers=1) as self._writer, self._hooks_installed():
            for shard, chunk in enumerate(chunks):
                n_shards = shard + 1
                if shard in self.done:  # kept; only its tokens may need writing again
                    if shard not in has_tokens:
                        self._write_tokens(shard, chunk)
                    continue
                files = self._forward_shard(shard, chunk)
                commit = self._writer.submit(self._commit_shard, shard, chunk, files)  # after the files
                if pending is not None:
                    pending.result()  # surfaces writer errors; at most two shards in memory
                pending = commit
            if pending is not None:
                pending.result()
        self.bar.close()
        self._finish(n_shards)

    def _forward_shard(self, shard: int, chunk: list[data.Sequence]) -> list[Future]:
        self._shard, self._rows, self._cursor = shard, len(chunk) * self.cfg.ctx_len, 0
        self._buffers: dict[str, torch.Tensor] = {}
        self._stats: dict[str, _RunningStats] = {}
        self._files: list[Future] = []
        with torch.inference_mode():
            for b in range(0, len(chunk), self.cfg.batch_size):
                batch = torch.tensor(
                    [s.tokens for s in chunk[b : b + self.cfg.batch_size]], device=self.model.cfg.device
                )
                self._fired: set[str] = set()
                self.model(batch, return_type=None)  # returns early once every site is captured
                self._cursor += batch.numel()
                self._tick(batch.numel())
        return self._files

    def _save(self, act: torch.Tensor, hook) -> None:
        if threading.get_ident() != self._owner:
            return  # a forward pass of another thread on the same (shared, pooled) model
        flat = sites.to_rows(hook.name, act)
        stats = self._stats.setdefault(hook.name, _RunningStats())
        stats.add(flat)  # here, while the activation is still in cache, not later from the buffer
        buffer = self._buffers.get(hook.name)
        if buffer is None:
            buffer = self._buffers[hook.name] = self._take_buffer(tuple(flat.shape[1:]))
        end = self._cursor + len(flat)
        buffer[self._cursor : end].copy_(flat)
        if end == self._rows:  # complete for this shard: write it while the model runs on
            self._files.append(
                self._writer.submit(self._write_point, self._shard, hook.name, buffer, end, stats)
            )
        self._fired.add(hook.name)
        if len(self._fired) == len(self._aliases):
            # Nothing after this point is stored: skip the rest of the forward pass (for block
            # sites, the final norm and the unembedding: ~20 % of smollm2-135m's FLOPs). The
            # Bridge catches its own stop exception and returns.
            raise _AllSitesCaptured(act)

    def _take_buffer(self, row_shape: tuple[int, ...]) -> torch.Tensor:
        free = self._free.get(row_shape)
        if free:
            return free.pop()  # list.pop/append are atomic: the writer thread returns buffers
        return aligned_empty((self.cfg.shard_seqs * self.cfg.ctx_len, *row_shape), self.dtype)  # O_DIRECT

    @contextmanager
    def _hooks_installed(self):
        """One hook per distinct hook point (alias names share its tensor), added once per capture:
        the Bridge rebuilds its alias table on every `hook_dict` lookup (~20 ms), so adding hooks
        per batch, as `run_with_hooks` does, cost more than copying the activations."""
        hook_dict = self.model.hook_dict
        points, self._aliases, self._owner = {}, {}, threading.get_ident()
        for site in self.sites:
            point = hook_dict[site]
            points[point.name] = point
            self._aliases.setdefault(point.name, []).append(site)
        for point in points.values():
            point.add_hook(self._save, dir="fwd", level=_HOOK_LEVEL)
        try:
            yield
        finally:
            for point in points.values():
                point.remove_hooks("fwd", level=_HOOK_LEVEL)

    def _tick(self, n: int) -> None:
        self.bar.update(n)
        self.tokens_done += n
        if self.callback:
            self.callback(self.tokens_done, self.total_seqs * self.cfg.ctx_len)

    def _write_point(
        self, shard: int, point: str, buffer: torch.Tensor, rows: int, stats: _RunningStats
    ) -> list[ShardRecord]:
        """Write one hook point's shard file (one per alias name); the buffer is free again after."""
        row0 = shard * self.cfg.shard_seqs * self.cfg.ctx_len
        acts, summary, records = buffer[:rows], stats.summary(), []
        for site in self._aliases[point]:
            path = self.root / "acts" / site_dir(site) / shard_name(shard)
            try:
                size, digest = write_safetensors(path, "acts", acts, {"site": site, "row_start": str(row0)})
            except OSError as err:
                err.filename = err.filename or str(path)  # os.write names no file; the message should
                raise
            records.append(ShardRecord(site, shard, row0, row0 + rows, size, digest, **summary))
            self._row_shapes[site] = list(acts.shape[1:])
        self._free.setdefault(tuple(buffer.shape[1:]), []).append(buffer)
        return records

    def _commit_shard(self, shard: int, chunk: list[data.Sequence], files: list[Future]) -> None:
        """Runs after the shard's file writes (the writer is one FIFO thread)."""
        new = {r.site: r for f in files for r in f.result()}
        if missing := [s for s in self.sites if s not in new]:
            raise StoreError(f"the forward pass never reached {missing[:3]}; these sites cannot be captured")
        self._write_tokens(shard, chunk)
        if not self.run["shapes"]:
            self.run["shapes"] = {s: self._row_shapes[s] for s in self.sites}
            paths.atomic_write_json(self.root / "run.json", self.run)
        self.records += [new[s] for s in self.sites]
        self._write_manifest()  # the commit point of this shard

    def _write_manifest(self) -> None:
        write_manifest(self.root, self.records, run_id=self.run["run_id"])

    def _write_tokens(self, shard: int, chunk: list[data.Sequence]) -> None:
        seq0 = shard * self.cfg.shard_seqs
        n = self.cfg.ctx_len
        table = pa.table(
            {
                "doc": pa.array([d for s in chunk for d in s.docs], pa.int32()),
                "seq": pa.array([seq0 + i for i in range(len(chunk)) for _ in range(n)], pa.int32()),
                "pos": pa.array([p for _ in chunk for p in range(n)], pa.int32()),
                "token": pa.array([t for s in chunk for t in s.tokens], pa.int32()),
            }
        )
        path = self.root / "tokens" / f"part-{shard:05d}.parquet"
        tmp = paths.temp_path_for(path)
        pq.write_table(table, tmp)
        # No fsync: on ext4 it forced a journal commit that waited for the shard just written
        # (0.3 s a shard). The rename alone survives a killed process, like the shard files.
        paths.commit_temp(tmp, path, fsync=False)

    def _finish(self, n_shards: int) -> None:
        """Check that every shard has its files and tokens, write tokens.parquet, mark the run
        complete, and only then drop the token parts: a kill at any point leaves a store that
        the next run of the same command completes."""
        shards = {r.shard for r in self.records}
        if not shards:
            raise StoreError(
                f"the text source {self.cfg.data} is too short for one sequence of {self.cfg.ctx_len} tokens"
            )
        if shards != set(range(n_shards)):
            raise StoreError(
                f"shards {sorted(set(range(n_shards)) - shards)[:5]} of {self.root} were not written; "
                "the store was not marked complete: re-run the same capture command"
            )
        n_rows = max(r.row_end for r in self.records)
        table, changed = store_state.assemble_tokens(self.root, self.records, self.cfg.ctx_len)
        store_state.check_tokens(self.root, table, n_rows, self.cfg.ctx_len)
        if changed:
            tmp = paths.temp_path_for(self.root / "tokens.parquet")
            pq.write_table(table, tmp)
            paths.commit_temp(tmp, self.root / "tokens.parquet")
        if not self.run["shapes"]:  # run.json was rebuilt and no shard was recomputed
            first = [r for r in self.records if r.shard == 0]
            self.run["shapes"] = {r.site: store_state.row_shape(r.path(self.root)) for r in first}
        self.run.update(status="complete", n_rows=n_rows, finished=time.time())
        paths.atomic_write_json(self.root / "run.json", self.run)
        store_state.remove_token_parts(self.root)


class _RunningStats:
    """Mean, std, mean row norm and |max| of one site over a shard, fed batch by batch."""

    def __init__(self):
        self.n = self.rows = 0
        self.total = self.squares = self.norms = self.abs_max = 0.0

    def add(self, rows: torch.Tensor) -> None:
        x = rows.reshape(len(rows), -1)
        norms = torch.linalg.vector_norm(x, dim=1).double()  # fp32 kernels: no float64 copy of x
        low, high = torch.aminmax(x)
        self.n += x.numel()
        self.rows += len(x)
        self.total += x.sum().item()  # torch's cascaded fp32 sum, accurate at this size
        self.squares += norms.square().sum().item()
        self.norms += norms.sum().item()
        self.abs_max = max(self.abs_max, high.item(), -low.item())

    def summary(self) -> dict[str, float]:
        mean = self.total / self.n
        return {
            "mean": mean,
            "std": max(self.squares / self.n - mean**2, 0.0) ** 0.5,
            "norm_mean": self.norms / self.rows,
            "abs_max": self.abs_max,
        }
