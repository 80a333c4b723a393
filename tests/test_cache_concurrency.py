"""Results cache under concurrency: several processes opening the same FRESH cache at the same instant.

Each worker process waits on a barrier, then opens a cache folder nobody has opened yet, writes to it
and lists it; this repeats for several rounds, so one test run makes many real collisions while the
process start-up (importing torch, which dominates the cost) is paid once. Before the index lock,
the `PRAGMA journal_mode=WAL` of two first openers raised `database is locked` about one run in
eight. `collide()` is also what the 50-round stress loop quoted in the cache's history runs.
"""

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import traceback

import torch

from workbench.cache import ResultsCache

PUTS, LISTS = 2, 5  # per worker and round


def _key(round_: int, worker: int, i: int) -> str:
    return f"{round_:032x}{worker:016x}{i:016x}"


def _open_write_list(root, worker, rounds, barrier):
    errors = []
    for r in range(rounds):
        barrier.wait()  # every worker opens round r's fresh cache at the same instant
        try:
            cache = ResultsCache(root / f"round-{r}")
            for i in range(PUTS):  # each put and list opens the index again, as the app and jobs do
                cache.put(
                    _key(r, worker, i),
                    config={"worker": worker},
                    meta={"analysis": "t", "version": 1},
                    result={"worker": worker},
                    arrays={"x": torch.full((4,), float(worker))},
                )
                for _ in range(LISTS):
                    cache.list()
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test with it
            errors.append(f"round {r} worker {worker}: {traceback.format_exc(limit=-2)}")
    (root / f"errors-{worker}.txt").write_text("".join(errors))


def collide(root, workers: int, rounds: int) -> list[str]:
    """Run `workers` processes through `rounds` simultaneous fresh opens; the errors they raised."""
    # forkserver children are fresh processes (no sqlite state inherited); preloading the cache
    # module in the server saves each child the ~10 s CPU of importing torch under `spawn`.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["workbench.cache", "torch"])
    barrier = ctx.Barrier(workers)
    args = [(root, w, rounds, barrier) for w in range(workers)]
    procs = [ctx.Process(target=_open_write_list, args=a) for a in args]
    for p in procs:
        p.start()
    _join(procs, barrier)
    found = [f"worker exit codes {[p.exitcode for p in procs]}"] if any(p.exitcode for p in procs) else []
    reports = [root / f"errors-{w}.txt" for w in range(workers)]
    return found + [
        r.read_text() if r.exists() else f"{r.name} missing"
        for r in reports
        if not r.exists() or r.read_text()
    ]


def _join(procs, barrier) -> None:
    """Wait for every worker's exit, never against a clock (workers that import torch under load
    took minutes); a worker that dies breaks the barrier, so the others stop waiting for it."""
    pending = {p.sentinel: p for p in procs}
    while pending:
        for sentinel in mp_connection.wait(list(pending)):
            p = pending.pop(sentinel)
            p.join()
            if p.exitcode:
                barrier.abort()


def test_processes_opening_a_fresh_cache_at_once_all_succeed(tmp_path):
    workers, rounds = 4, 25
    assert collide(tmp_path, workers, rounds) == []
    for r in range(rounds):
        cache = ResultsCache(tmp_path / f"round-{r}")
        keys = [_key(r, w, i) for w in range(workers) for i in range(PUTS)]
        assert sorted(row["key"] for row in cache.list()) == keys
        for w in range(workers):
            assert cache.get(_key(r, w, PUTS - 1)).result == {"worker": w}


def test_processes_meeting_a_garbled_index_at_once_rebuild_it_once(tmp_path):
    workers, rounds = 4, 4
    for r in range(rounds):  # each round's cache holds one entry and a garbled index
        seed = ResultsCache(tmp_path / f"round-{r}")
        seed.put("f" * 64, config={}, meta={"analysis": "t"}, result={}, arrays={"x": torch.zeros(1)})
        seed.index_path.write_bytes(b"not a database " * 1000)
    assert collide(tmp_path, workers, rounds) == []
    for r in range(rounds):
        root = tmp_path / f"round-{r}"
        assert len(list(root.glob("index.sqlite.damaged-*"))) == 1  # one repairer, the rest waited
        assert len(ResultsCache(root).list()) == workers * PUTS + 1
