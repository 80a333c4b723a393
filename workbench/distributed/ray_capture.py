"""Distributed capture on Ray: the token range is split into shard jobs run by actors, and the
driver commits each finished shard to the manifest.

Each actor loads the model once and writes whole shards with the local capture's own code
(`workbench.capture._Capture`: the same hooks, the same atomic shard files, the same token parts),
so a store written on Ray is byte-identical to one written in a single process with the same
configuration and thread count. The driver holds the store's writer lock and is the only writer
of `manifest.parquet` and `run.json`: a shard exists once the driver has recorded it. A worker
that dies mid-shard is restarted by Ray and its shard rerun (the retry overwrites the files; a
torn temp file is never in the manifest, and is deleted at the end); a driver that dies leaves a
store that the same command resumes, committed shards kept.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from tqdm.auto import tqdm

from workbench import data, paths, sites, store_state
from workbench.capture import _Capture, _disk_full, _open_run, run_identity
from workbench.capture_config import CaptureConfig
from workbench.distributed.ray_engine import RayEngineError, check_workers, connect, required_packages
from workbench.store import ActivationStore, ShardRecord, StoreError, write_manifest

IN_FLIGHT = 2  # shards queued per actor: one forwards while the other's files are written
MAX_RETRIES = 3  # restarts of a dead actor, and reruns of the shard it held
_KEPT_CHUNKS = 8  # packed shards an actor keeps when a later one arrives first (threads reorder)
AfterWrite = Callable[[int, str], None]


class ShardWriter(_Capture):
    """A capture's shard jobs without its manifest: `forward` (one thread at a time; the hooks
    store only the forwarding thread's activations) then `finish`, which waits for the files,
    writes the token part and returns the shard's records for the driver to commit."""

    def __init__(self, cfg: CaptureConfig, model, root: Path, run: dict):
        super().__init__(cfg, model, root, run, progress=False)
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._hooks = ExitStack()
        self._hooks.enter_context(self._hooks_installed())

    def forward(self, shard: int, chunk: list[data.Sequence]) -> list[Future]:
        self._owner = threading.get_ident()
        return self._forward_shard(shard, chunk)

    def finish(self, shard: int, chunk: list[data.Sequence], files: list[Future]) -> list[ShardRecord]:
        new = {r.site: r for f in files for r in f.result()}
        if missing := [s for s in self.sites if s not in new]:
            raise StoreError(f"the forward pass never reached {missing[:3]}; these sites cannot be captured")
        self._write_tokens(shard, chunk)
        return [new[s] for s in self.sites]


class _Chunks:
    """Shard k's sequences from the deterministic packing stream, read forward (restarted only
    when an earlier shard than any kept is asked for, e.g. after a retry)."""

    def __init__(self, cfg: CaptureConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._restart()

    def _restart(self) -> None:
        seqs = data.pack(self.cfg.data, self.tokenizer, self.cfg.ctx_len, self.cfg.bos)
        seqs = itertools.islice(seqs, self.cfg.n_tokens // self.cfg.ctx_len)
        self._it = iter(lambda: list(itertools.islice(seqs, self.cfg.shard_seqs)), [])
        self._next, self._kept = 0, {}

    def get(self, shard: int) -> list[data.Sequence]:
        if shard in self._kept:
            return self._kept.pop(shard)
        if shard < self._next:
            self._restart()
        for index in range(self._next, shard + 1):
            chunk = next(self._it, None)
            if chunk is None:
                raise StoreError(f"shard {shard} lies past the end of the text source {self.cfg.data}")
            self._kept[index] = chunk
            self._next = index + 1
        while len(self._kept) > _KEPT_CHUNKS:
            self._kept.pop(min(self._kept))
        return self._kept.pop(shard)

    def count(self) -> int:
        """Sequences the text fills within the token budget, read from a fresh stream."""
        seqs = data.pack(self.cfg.data, self.tokenizer, self.cfg.ctx_len, self.cfg.bos)
        return sum(1 for _ in itertools.islice(seqs, self.cfg.n_tokens // self.cfg.ctx_len))


class CaptureWorker:
    """A Ray actor's state: the model (loaded once per actor, again only after a restart), the
    packing stream and a ShardWriter. `after_write(shard, root)` runs once a shard's files are
    written, before they are reported (a test kills the worker there)."""

    def __init__(self, cfg: CaptureConfig, threads: int = 1, after_write: AfterWrite | None = None):
        import torch

        from workbench.models import load_model

        torch.set_num_threads(threads)  # as many as the CPUs Ray reserved for this actor
        self.cfg, self.after_write = cfg, after_write
        self.model = load_model(cfg.model, cfg.processing)
        cfg.check_model(self.model)
        self.sites = sites.resolve_for_model(cfg.sites, self.model)
        self.chunks = _Chunks(cfg, self.model.tokenizer)
        self.writer: ShardWriter | None = None
        self.lock = threading.Lock()

    def describe(self) -> dict:
        return {
            "identity": run_identity(self.cfg, self.model, self.sites),
            "sites": self.sites,
            "aliases": sites.recorded_aliases(self.model, self.sites),
        }

    def count_sequences(self) -> int:
        return self.chunks.count()

    def _writer_for(self, root: str, run: dict) -> ShardWriter:
        if self.writer is None or self.writer.root != Path(root):
            self.writer = ShardWriter(self.cfg, self.model, Path(root), run)
        return self.writer

    def write_shard(self, shard: int, root: str, run: dict) -> list[ShardRecord]:
        with self.lock:
            writer = self._writer_for(root, run)
            chunk = self.chunks.get(shard)
            files = writer.forward(shard, chunk)
        records = writer.finish(shard, chunk, files)
        if self.after_write is not None:
            self.after_write(shard, root)
        return records

    def write_tokens(self, shard: int, root: str, run: dict) -> None:
        """Rewrite the token part of a committed shard (lost with a killed driver's last step)."""
        with self.lock:
            self._writer_for(root, run)._write_tokens(shard, self.chunks.get(shard))


def capture_on_ray(
    cfg: CaptureConfig,
    out: str | Path | None = None,
    address: str | None = None,
    workers: int = 2,
    progress: bool | Callable[[int, int], None] = True,
    after_write: AfterWrite | None = None,
    threads: int = 1,
) -> ActivationStore:
    """Capture `cfg` with `workers` Ray actors (`threads` CPUs and torch threads each) into one
    store on a filesystem every node sees; the same store, byte for byte, as
    `workbench.capture.capture` writes with as many torch threads."""
    import ray

    if workers < 1 or threads < 1:
        raise ValueError(f"workers and threads must be at least 1, got {workers} and {threads}")
    out_path = Path(out).resolve() if out is not None else None
    if out_path is not None:
        store_state.check_out_folder(out_path)  # before the cluster is touched
    connect(address, num_cpus=workers * threads if address is None else None)
    base = out_path.parent if out_path is not None else paths.stores_dir()
    base.mkdir(parents=True, exist_ok=True)
    # Workers on other nodes have another working directory: they get absolute text paths (the
    # run's identity holds the text's content hash, not its path, so the store is the same).
    sources = [p if p.startswith("hf:") else str(Path(p).resolve()) for p in data.split_sources(cfg.data)]
    cfg = dataclasses.replace(cfg, data=",".join(sources))
    needed = [("the store folder", str(base))] + [("the text source", p) for p in sources if p[:3] != "hf:"]
    if Path(cfg.model).is_dir():
        needed.append(("the model folder", str(Path(cfg.model).resolve())))
    check_workers(needed, required_packages(cfg.model))
    actor_cls = ray.remote(CaptureWorker).options(
        num_cpus=threads, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES, max_concurrency=IN_FLIGHT
    )
    actors = [actor_cls.remote(cfg, threads, after_write) for _ in range(workers)]
    try:
        info = _same_everywhere(_get([a.describe.remote() for a in actors]))
        run_id = paths.sha256_json(info["identity"])
        root = out_path or paths.stores_dir() / run_id[:16]
        _drive(actors, cfg, root, info, run_id, progress)
    finally:
        for actor in actors:
            ray.kill(actor)
    return ActivationStore(root)


def _same_everywhere(described: list[dict]) -> dict:
    """Every actor booted the same model and resolved the same sites (else their shards would mix)."""
    for other in described[1:]:
        if other != described[0]:
            raise RayEngineError(
                f"Ray workers disagree on the capture: {described[0]['identity']['model']} against "
                f"{other['identity']['model']}; every node needs the same model files and packages"
            )
    return described[0]


def _drive(actors: list, cfg: CaptureConfig, root: Path, info: dict, run_id: str, progress) -> None:
    """The local capture's open/resume/repair steps, with shard jobs sent to the actors."""
    existed = root.exists()
    with store_state.writer_lock(root):
        created = not store_state.is_store(root) and store_state.only_ours(root)
        run = _open_run(root, cfg, info["identity"], run_id, info["sites"], info["aliases"])
        if run["status"] == "complete":
            if store_state.healthy(root, run):
                return
            store_state.log.warning(f"store {root.name} is damaged; rewriting its missing or damaged shards")
            run["status"] = "running"
            paths.atomic_write_json(root / "run.json", run)
        try:
            _Driver(actors, cfg, root, run, progress).go(_get(actors[0].count_sequences.remote()))
        except BaseException as err:
            if created:
                store_state.remove_new_store(root, run["sites"], whole_folder=not existed)
            if _disk_full(err):
                raise StoreError(
                    f"disk full while writing {getattr(err, 'filename', None) or root}: free space and "
                    "re-run the same command to resume"
                ) from err
            raise


class _Driver:
    """Sends each missing shard to the next free actor and commits what comes back."""

    def __init__(self, actors: list, cfg: CaptureConfig, root: Path, run: dict, progress):
        self.actors, self.cfg, self.root, self.run = actors, cfg, root, run
        self.sites: list[str] = run["sites"]
        self.records = store_state.good_records(root, self.sites)
        self.callback = progress if callable(progress) else None
        self.quiet = progress is False or self.callback is not None

    def go(self, n_seqs: int) -> None:
        import ray

        n_shards = -(-n_seqs // self.cfg.shard_seqs)
        done = {r.shard for r in self.records}
        has_tokens = store_state.token_shards(self.root, self.records, self.cfg.ctx_len)
        store_state.remove_orphans(self.root, self.sites, done)
        self._commit([])  # drop rows of shards that did not survive
        lost = sorted(k for k in done - has_tokens if k < n_shards)
        _get(
            [
                self.actors[i % len(self.actors)].write_tokens.remote(k, str(self.root), self.run)
                for i, k in enumerate(lost)
            ]
        )
        queue = deque(k for k in range(n_shards) if k not in done)
        done_rows = sum(r.row_end - r.row_start for r in self.records if r.site == self.sites[0])
        bar = tqdm(
            total=n_seqs * self.cfg.ctx_len,
            initial=done_rows,
            unit="tok",
            unit_scale=True,
            desc="capture (ray)",
            disable=self.quiet,
        )
        pending: dict = {}
        for i in itertools.chain.from_iterable(itertools.repeat(range(len(self.actors)), IN_FLIGHT)):
            self._submit(i, queue, pending)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready)
            new = _get(ready)
            self._commit(new)
            done_rows += new[0].row_end - new[0].row_start
            bar.update(new[0].row_end - new[0].row_start)  # a disabled bar counts nothing: done_rows does
            if self.callback:
                self.callback(done_rows, n_seqs * self.cfg.ctx_len)
            self._submit(i, queue, pending)
        bar.close()
        store_state.remove_orphans(self.root, self.sites, {r.shard for r in self.records})  # torn temp files
        finisher = _Capture(self.cfg, None, self.root, self.run, progress=False)
        finisher.records = self.records
        finisher._finish(n_shards)

    def _submit(self, actor: int, queue: deque, pending: dict) -> None:
        if queue:
            ref = self.actors[actor].write_shard.remote(queue.popleft(), str(self.root), self.run)
            pending[ref] = actor

    def _commit(self, new: list[ShardRecord]) -> None:
        """Record a finished shard: the manifest in shard order (as a local capture writes it)."""
        order = {s: i for i, s in enumerate(self.sites)}
        self.records = sorted(self.records + new, key=lambda r: (r.shard, order[r.site]))
        write_manifest(self.root, self.records, run_id=self.run["run_id"])
        if new and not self.run["shapes"]:
            self.run["shapes"] = {r.site: store_state.row_shape(r.path(self.root)) for r in new}
            paths.atomic_write_json(self.root / "run.json", self.run)


def _get(refs):
    """ray.get, with a worker's own error (a StoreError, a missing model) raised as itself."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as err:
        if isinstance(err.cause, Exception):
            raise err.cause from None
        raise
    except RayActorError as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise RayEngineError(f"a Ray capture worker died and could not be restarted: {detail}") from err
