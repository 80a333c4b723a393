"""One writer per store: two captures of the same config at once give one complete, correct store."""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from workbench.capture import CaptureConfig, capture
from workbench.store_state import writer_lock

SITES = ("blocks.*.mlp.hook_post", "blocks.0.hook_resid_post")
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
while len(os.listdir(ready)) < 2:  # start both captures together
    time.sleep(0.01)
cfg = CaptureConfig(model=model_dir, data=data, sites=SITES, n_tokens=512, ctx_len=32, batch_size=2,
                    shard_tokens=64)
store = capture(cfg, model=model, out=out, progress=False)
print(json.dumps({"pid": os.getpid(), "rows": store.n_rows, "complete": store.complete}))
"""


def _cfg(model_dir, data):
    return CaptureConfig(
        model=str(model_dir), data=data, sites=SITES, n_tokens=512, ctx_len=32, batch_size=2, shard_tokens=64
    )


def test_two_processes_capturing_the_same_store(tiny_model, tiny_model_dir, wikitext, tmp_path):
    from workbench.store import ActivationStore

    out, ready = tmp_path / "store", tmp_path / "ready"
    ready.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tiny_model_dir), wikitext, str(out), str(ready), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [child.communicate(timeout=300) for child in children]
    assert [c.returncode for c in children] == [0, 0], [err[-2000:] for _, err in results]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    assert all(r["complete"] and r["rows"] == 512 for r in reports)
    pids = [r["pid"] for r in reports]
    waits = [line for _, err in results for line in err.splitlines() if "being written by another" in line]
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
    tiny_model, tiny_model_dir, wikitext, tmp_path, caplog
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
        with caplog.at_level(logging.WARNING, logger="workbench.capture"):
            waiter.start()
            deadline = time.time() + 60
            while "waiting" not in caplog.text and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            assert waiter.is_alive() and not done  # it waits instead of writing alongside
            assert (
                f"store store is being written by another capture (pid {os.getpid()}); waiting" in caplog.text
            )
            (out / "run.json").write_text((out / "run.json").read_text().replace('"running"', '"complete"'))
    waiter.join(60)
    assert done and done[0].complete and torch.equal(done[0].read(SITES[1]), first.read(SITES[1]))
