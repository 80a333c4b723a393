"""Train while capturing: `FollowStream` reads only committed shards of a capture in progress,
waits for new ones, ends when the capture finishes, and yields the same batches as after it."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from workbench import paths
from workbench.sae.data import FollowStream
from workbench.store import ActivationStore, read_manifest, write_manifest

SITE = "blocks.1.hook_resid_post"
BATCH = 64


@pytest.fixture
def complete(tiny_store):
    """A finished tiny store of 4 shards (32 sequences of 32 tokens each)."""
    return tiny_store((SITE,), 4096)


def drain(stream) -> list[torch.Tensor]:
    return [b.clone() for b in stream]


def kept_rows(store: ActivationStore) -> Counter:
    """Every row but BOS (position 0), as hashable tuples."""
    x = store.read(SITE)[store.positions() != 0].flatten(1).float()
    return Counter(map(tuple, x.tolist()))


class Publisher(threading.Thread):
    """Replays a finished capture into `dst` shard by shard, in the capture's commit order:
    activation file, token part, then the manifest row (the commit). Before each commit the NEXT
    shard's path already holds garbage, so reading any uncommitted shard would fail."""

    def __init__(self, src: ActivationStore, dst: Path, pause: float):
        super().__init__(daemon=True)
        self.src, self.dst, self.pause = src, dst, pause
        self.committed: list[int] = []  # appended right after each manifest write
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._replay()
        except BaseException as err:  # noqa: BLE001 - surfaced by the test
            self.error = err

    def _replay(self) -> None:
        src, dst = self.src.root, self.dst
        run = json.loads((src / "run.json").read_text())
        (dst / "acts" / SITE).mkdir(parents=True)
        (dst / "tokens").mkdir()
        paths.atomic_write_json(dst / "run.json", run | {"status": "running"})
        records, tokens = read_manifest(src), self.src.tokens()
        for rec in records:
            shutil.copy(rec.path(src), rec.path(dst))
            part = tokens.slice(rec.row_start, rec.row_end - rec.row_start)
            pq.write_table(part, dst / "tokens" / f"part-{rec.shard:05d}.parquet")
            nxt = rec.path(dst).with_name(f"shard-{rec.shard + 1:05d}.safetensors")
            nxt.write_bytes(b"torn: not committed")  # an uncommitted file the reader must not touch
            time.sleep(self.pause)
            write_manifest(dst, records[: rec.shard + 1], run_id=run["run_id"])
            self.committed.append(rec.shard)
        nxt.unlink()
        shutil.copy(src / "tokens.parquet", dst / "tokens.parquet")
        paths.atomic_write_json(dst / "run.json", run)  # complete
        shutil.rmtree(dst / "tokens")


def test_follow_reads_committed_rows_once_waits_and_ends(complete, tmp_path):
    reference = drain(FollowStream(complete.root, [SITE], BATCH, seed=5))
    publisher = Publisher(complete, tmp_path / "live", pause=0.05)
    waits: list[int] = []
    publisher.start()
    while not (publisher.dst / "run.json").exists():
        time.sleep(0.001)
    stream = FollowStream(publisher.dst, [SITE], BATCH, seed=5, poll_s=0.01, on_wait=waits.append)
    seen_at_read: list[bool] = []
    original = stream._rows

    def checked_rows(store, shard):  # every shard read was committed by then
        seen_at_read.append(shard in publisher.committed)
        return original(store, shard)

    stream._rows = checked_rows
    live = drain(stream)  # returns only because the capture completed
    publisher.join()
    assert publisher.error is None
    assert all(seen_at_read) and stream.shards_read == list(range(complete.n_shards(SITE)))
    assert waits, "the stream caught up with the capture and waited"
    # timing-independent: the same batches as over the finished store
    assert len(live) == len(reference) and all(torch.equal(a, b) for a, b in zip(live, reference))
    # exactly the kept rows, each once, but the final remainder (< one batch)
    kept = kept_rows(complete)
    n_kept = sum(kept.values())
    assert len(live) == n_kept // BATCH
    got = Counter(map(tuple, torch.cat(live).tolist()))
    assert not got - kept  # no row that is not a kept row, none more often than stored
    assert n_kept - sum(got.values()) < BATCH


def test_follow_during_a_real_capture_and_resume(tiny_model, tiny_model_dir, wikitext, tmp_path):
    import workbench as wb

    out = tmp_path / "growing"
    done = threading.Event()

    def capture() -> None:
        wb.capture(
            model=str(tiny_model_dir),
            data=wikitext,
            n_tokens=4096,
            ctx_len=32,
            progress=False,
            sites=(SITE,),
            out=str(out),
        )
        done.set()

    from workbench.context import POOL

    POOL.put(tiny_model)  # the thread's capture uses this bridge
    worker = threading.Thread(target=capture, daemon=True)
    worker.start()
    while not (out / "run.json").exists():
        time.sleep(0.01)
    live = drain(FollowStream(out, [SITE], BATCH, seed=1, poll_s=0.01))
    worker.join()
    assert done.is_set()
    after = drain(FollowStream(out, [SITE], BATCH, seed=1))
    assert len(live) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(live, after))
    resumed = drain(FollowStream(out, [SITE], BATCH, seed=1, start=7))
    assert len(resumed) == len(after) - 7 and all(torch.equal(a, b) for a, b in zip(resumed, after[7:]))


def test_special_ids_are_left_out(complete):
    ids = complete.token_ids()
    common = int(ids[complete.positions() != 0].mode().values)  # the most frequent ordinary token
    stream = FollowStream(complete.root, [SITE], BATCH, special_ids=[common])
    rows = torch.cat(drain(stream))
    left_out = complete.read(SITE)[ids == common].flatten(1).float()
    assert not (rows[:, None, :] == left_out[None, :, :]).all(-1).any()
    expected = int(((complete.positions() != 0) & (ids != common)).sum())
    assert len(rows) == expected // BATCH * BATCH


def test_capture_and_train_equals_training_after_the_capture(tiny_model, tiny_model_dir, wikitext):
    """Trained while the store fills == trained again on the finished store (same seed): the
    follow stream's batches do not depend on the capture's speed."""
    from workbench.capture import CaptureConfig
    from workbench.sae.follow import capture_and_train, special_ids
    from workbench.sae.io import load_dictionary

    cfg = CaptureConfig(
        model=str(tiny_model_dir), sites=(SITE,), data=wikitext, n_tokens=4096, ctx_len=32, shard_tokens=256
    )
    live = capture_and_train(cfg, d_sae=128, k=8, batch_size=BATCH, lr=1e-3, model=tiny_model, show_bar=False)
    assert live.steps == (4096 // 32) * 31 // BATCH  # one pass over the non-BOS rows, by default
    # the follow pass also leaves out special tokens (document separators): the last steps are a
    # StoreStream epoch of the finished store
    one_pass = FollowStream(live.store, [SITE], BATCH, special_ids=special_ids(tiny_model))
    assert live.follow_batches == len(drain(one_pass)) < live.steps
    assert live.capture_seconds > 0 and Path(live.dictionary, "cfg.json").exists()
    first = {k: v.clone() for k, v in load_dictionary(live.dictionary).state_dict().items()}
    shutil.rmtree(live.dictionary)
    again = capture_and_train(
        cfg, d_sae=128, k=8, batch_size=BATCH, lr=1e-3, model=tiny_model, show_bar=False
    )
    assert again.store == live.store and again.waited_seconds == 0  # the store was complete
    second = load_dictionary(again.dictionary).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_capture_and_train_takes_one_site(tiny_model_dir, wikitext):
    from workbench.capture import CaptureConfig
    from workbench.sae.follow import capture_and_train

    cfg = CaptureConfig(model=str(tiny_model_dir), sites=(SITE, "blocks.0.hook_resid_post"), data=wikitext)
    with pytest.raises(
        ValueError, match=r"^train while capturing takes one site; got blocks.1.hook_resid_post, "
    ):
        capture_and_train(cfg)
