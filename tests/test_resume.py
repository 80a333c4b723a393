"""kill -9 during a capture, then the same capture again: exactly the rows of an uninterrupted run.

The kill waits for events, never for a clock: it lands once three shards are committed (on a loaded
machine the child took over 120 s just to import torch and load the model), and the child stops
for good before its 9th batch, so a parent paused after seeing three shards still kills mid-run."""

import subprocess
import sys
import time

import pyarrow.parquet as pq
import torch

from workbench.capture import CaptureConfig, capture
from workbench.store import ActivationStore

STOP_AT = 9  # the child blocks in its 9th forward pass: at most 8 of the 16 shards are committed
CHILD = f"""
import itertools, os, sys, time
from workbench.capture import CaptureConfig, capture
from workbench.models import load_model
model_dir, data, out = sys.argv[1:4]
model = load_model(model_dir)
calls = itertools.count(1)

def slow(act, hook):
    time.sleep(0.15)  # slow it down so the kill lands while shards are being written
    if next(calls) == {STOP_AT}:
        sys.stdin.read()  # blocks until the parent kills us (EOF: the parent died; exit)
        os._exit(3)

model.add_perma_hook("hook_embed", slow)
cfg = CaptureConfig(model=model_dir, data=data, sites=("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post"),
                    n_tokens=1024, ctx_len=32, batch_size=2, shard_tokens=64)
capture(cfg, model=model, out=out, progress=False)
"""


def _cfg(model_dir, data):
    return CaptureConfig(
        model=str(model_dir),
        data=data,
        sites=("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post"),
        n_tokens=1024,
        ctx_len=32,
        batch_size=2,
        shard_tokens=64,
    )


def _committed_shards(out):
    path = out / "manifest.parquet"
    try:
        return len(set(pq.read_table(path).column("shard").to_pylist())) if path.exists() else 0
    except Exception:  # noqa: BLE001 - mid-rename; try again
        return 0


def test_kill9_then_resume_equals_uninterrupted(tiny_model, tiny_model_dir, wikitext, tmp_path):
    killed = tmp_path / "killed"
    argv = [sys.executable, "-c", CHILD, str(tiny_model_dir), wikitext, str(killed)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE)
    while _committed_shards(killed) < 3 and child.poll() is None:  # it ends only if it failed
        time.sleep(0.05)
    child.kill()  # SIGKILL; a no-op if it already exited (no pid of someone else is signalled)
    child.wait()
    child.stdin.close()
    partial = _committed_shards(killed)
    assert child.returncode == -9, f"the capture ended by itself (exit {child.returncode}) before the kill"
    assert 3 <= partial < STOP_AT, f"the kill should land mid-capture (committed {partial} of 16 shards)"

    resumed = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=killed, progress=False)
    fresh = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=tmp_path / "fresh", progress=False)
    assert resumed.complete and resumed.n_rows == fresh.n_rows == 1024
    assert resumed.tokens().equals(fresh.tokens())
    for site in fresh.sites:
        assert torch.equal(resumed.read(site), fresh.read(site)), site
    assert not list(killed.rglob("*.tmp")) and not ActivationStore(killed).verify()
