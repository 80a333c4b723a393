"""One writer per store: two captures of the same config at once give one complete, correct store.

No test here waits against a clock: a loaded machine (7 test runs on 2 cores) took over 300 s to
start two children that import torch, and a capture paused between taking the lock and writing its
pid made the waiter name "pid unknown". Every wait is for the event itself (a child's exit, a line
on its stdin, a logged warning)."""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from workbench import store_state
from workbench.capture import CaptureConfig, capture
from workbench.store_state import writer_lock

SITES = ("blocks.*.mlp.hook_post", "blocks.0.hook_resid_post")
WAITING = "is being written by another capture"
CHILD = """
import json, os, sys, time
from pathlib import Path
from workbench.capture import CaptureConfig, capture
from workbench.models import load_model
SITES = ("blocks.*.mlp.hook_post", "blocks.0.hook_resid_post")
model_dir, data, out, ready, me = sys.argv[1:6]
model = load_model(model_dir)
model.add_perma_hook("hook_embed", lambda act, hook: time.sleep(0.05))  # a capture of ~1 s
Path(ready, me).touch()
sys.stdin.readline()  # the parent says go once both are loaded (EOF if it died: go anyway)
cfg = CaptureConfig(model=model_dir, data=data, sites=SITES, n_tokens=512, ctx_len=32, batch_size=2,
                    shard_tokens=64)
store = capture(cfg, model=model, out=out, progress=False)
print(json.dumps({"pid": os.getpid(), "rows": store.n_rows, "complete": store.complete}))
"""


def _cfg(model_dir, data):
    return CaptureConfig(
        model=str(model_dir), data=data, sites=SITES, n_tokens=512, ctx_len=32, batch_size=2, shard_tokens=64
    )


@pytest.fixture
def announced():
    """An Event set when a capture logs that it waits for another writer, and the logged lines."""

    class Announced(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.event, self.lines = threading.Event(), []

        def emit(self, record):
            self.lines.append(record.getMessage())
            if WAITING in record.getMessage():
                self.event.set()

    handler, logger = Announced(), logging.getLogger("workbench.capture")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _start_together(children, ready):
    """Let the children capture once both have loaded their model (or one has already exited)."""
    while len(os.listdir(ready)) < len(children) and all(c.poll() is None for c in children):
        time.sleep(0.01)
    for child in children:
        try:
            child.stdin.write("go\n")
            child.stdin.close()
        except BrokenPipeError:  # it exited: its return code and stderr fail the test below
            pass


def test_two_processes_capturing_the_same_store(tiny_model, tiny_model_dir, wikitext, tmp_path):
    from workbench.store import ActivationStore

    out, ready = tmp_path / "store", tmp_path / "ready"
    ready.mkdir()
    logs = [(tmp_path / f"out-{i}", tmp_path / f"err-{i}") for i in range(2)]
    children = []
    for i, (out_log, err_log) in enumerate(logs):
        with open(out_log, "w") as stdout, open(err_log, "w") as stderr:  # files, not pipes: a
            # full pipe would stall a child that nobody reads before it exits
            argv = [sys.executable, "-c", CHILD, str(tiny_model_dir), wikitext, str(out), str(ready), str(i)]
            children.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, text=True)
            )
    _start_together(children, ready)
    codes = [child.wait() for child in children]
    results = [(out_log.read_text(), err_log.read_text()) for out_log, err_log in logs]
    assert codes == [0, 0], [err[-2000:] for _, err in results]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    assert all(r["complete"] and r["rows"] == 512 for r in reports)
    pids = [r["pid"] for r in reports]
    waits = [line for _, err in results for line in err.splitlines() if WAITING in line]
    print(f"second writer waited: {len(waits)}")  # shown with -s: how often the captures overlapped
    assert len(waits) <= 1  # whoever came second waited for the first, and named it
    assert all(f"(pid {pids[0]})" in w or f"(pid {pids[1]})" in w for w in waits)

    store, single = (
        ActivationStore(out),
        capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=tmp_path / "single", progress=False),
    )
    tokens = store.tokens()
    rows = np.arange(512)
    assert np.array_equal(tokens.column("seq").to_numpy(), rows // 32)  # every row exactly once
    assert np.array_equal(tokens.column("pos").to_numpy(), rows % 32)
    assert tokens.equals(single.tokens()) and store.verify() == []
    for site in single.sites:
        assert torch.equal(store.read(site), single.read(site)), site
    assert not (out / "tokens").exists() and not list(out.rglob("*.tmp"))


def test_a_second_writer_waits_says_so_and_finds_the_store_complete(
    tiny_model, tiny_model_dir, wikitext, tmp_path, announced
):
    out = tmp_path / "store"
    first = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=out, progress=False)
    (out / "run.json").write_text((out / "run.json").read_text().replace('"complete"', '"running"'))
    done: list = []
    with writer_lock(out):  # another capture holds the store
        waiter = threading.Thread(
            target=lambda: done.append(
                capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=out, progress=False)
            )
        )
        waiter.start()
        assert announced.event.wait(300), "the waiter never said it waits"  # a hang guard, not a deadline
        time.sleep(0.2)
        assert waiter.is_alive() and not done  # it waits instead of writing alongside
        assert announced.lines == [f"store store {WAITING} (pid {os.getpid()}); waiting"]
        (out / "run.json").write_text((out / "run.json").read_text().replace('"running"', '"complete"'))
    waiter.join()
    assert done and done[0].complete and torch.equal(done[0].read(SITES[1]), first.read(SITES[1]))


def test_a_waiter_names_a_holder_paused_before_writing_its_pid(tmp_path, monkeypatch, announced):
    """The holder takes the lock, then is paused (as a loaded machine does) until the waiter has
    found no pid in the file and tried the lock again; the waiter must name it, not "pid unknown"."""
    root, write_pid, try_lock = tmp_path / "store", store_state._write_pid, store_state._try_lock
    refusals, paused, looked_again, release = [], threading.Event(), threading.Event(), threading.Event()

    def counting_try_lock(fd, tries=5):
        taken = try_lock(fd, tries)
        if not taken:
            refusals.append(fd)
        if len(refusals) >= 2:  # refused, found no pid, and tried again
            looked_again.set()
        return taken

    def paused_write_pid(fd):
        paused.set()
        looked_again.wait(30)  # a hang guard only: the old code never looked again
        write_pid(fd)

    def hold():
        with writer_lock(root):
            release.wait()

    def wait_for_lock():
        with writer_lock(root):
            pass

    monkeypatch.setattr(store_state, "_try_lock", counting_try_lock)
    monkeypatch.setattr(store_state, "_write_pid", paused_write_pid)
    holder, waiter = threading.Thread(target=hold), threading.Thread(target=wait_for_lock)
    holder.start()
    try:
        assert paused.wait(300), "the holder never took the lock"  # hang guards, not deadlines
        waiter.start()
        assert announced.event.wait(300), "the waiter never said it waits"
        assert announced.lines == [f"store store {WAITING} (pid {os.getpid()}); waiting"]
    finally:
        release.set()
        holder.join()
        if waiter.ident:  # started
            waiter.join()
