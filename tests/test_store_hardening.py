"""The store never serves damaged data and repairs itself when the same capture runs again."""

import errno
import importlib
import os

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from workbench.capture import CaptureConfig, capture
from workbench.store import ActivationStore, StoreError, list_stores

capture_mod = importlib.import_module("workbench.capture")  # the package exports a capture() too
SITE = "blocks.0.mlp.hook_post"


def _cfg(model_dir, data, **kw):
    base = {"sites": (SITE,), "n_tokens": 256, "ctx_len": 32, "batch_size": 2, "shard_tokens": 64}
    return CaptureConfig(model=str(model_dir), data=data, **{**base, **kw})


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def _shard(store, k, site=SITE):
    return store.root / "acts" / site / f"shard-{k:05d}.safetensors"


def test_flipped_byte_is_refused_on_read_and_the_rerun_rewrites_only_that_shard(
    tiny_model, tiny_model_dir, wikitext, monkeypatch
):
    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    good, fingerprint = store.read(SITE), store.fingerprint
    _flip_last_byte(_shard(store, 1))
    before0 = _shard(store, 0).stat()
    with pytest.raises(StoreError, match=r"shard 1 of site blocks.0.mlp.hook_post is damaged: .*shard-00001"):
        ActivationStore(store.root).read(SITE)
    assert not _shard(store, 1).exists()  # set aside, so the size check of the rerun finds it

    forwarded = []
    real = capture_mod._Capture._forward_shard
    monkeypatch.setattr(
        capture_mod._Capture, "_forward_shard", lambda self, k, c: forwarded.append(k) or real(self, k, c)
    )
    again = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert forwarded == [1] and again.complete
    assert (_shard(store, 0).stat().st_ino, _shard(store, 0).stat().st_mtime_ns) == (
        before0.st_ino,
        before0.st_mtime_ns,
    )
    assert torch.equal(ActivationStore(store.root).read(SITE), good)
    assert ActivationStore(store.root).fingerprint == fingerprint  # same bytes again
    assert not list(store.root.rglob(".*.damaged")) and not list(store.root.rglob("*.tmp"))


def test_checksum_is_computed_once_per_shard_per_process(tiny_model, tiny_model_dir, wikitext, monkeypatch):
    store = capture(
        _cfg(tiny_model_dir, wikitext, sites=("blocks.1.mlp.hook_post",)), model=tiny_model, progress=False
    )
    import workbench.store

    hashed = []
    real = workbench.store._checksum_ok
    monkeypatch.setattr(workbench.store, "_checksum_ok", lambda p, c: hashed.append(p) or real(p, c))
    fresh = ActivationStore(store.root)
    fresh.read("blocks.1.mlp.hook_post")
    fresh.read("blocks.1.mlp.hook_post", 10, 20)
    ActivationStore(store.root).shard("blocks.1.mlp.hook_post", 2)
    assert sorted(p.name for p in hashed) == [f"shard-0000{k}.safetensors" for k in range(4)]


def test_fingerprint_follows_the_contents(tiny_model, tiny_model_dir, wikitext):
    from workbench.shard_files import write_safetensors
    from workbench.store import read_manifest, write_manifest

    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    records = read_manifest(store.root)
    size, checksum = write_safetensors(_shard(store, 3), "acts", torch.zeros(64, 128), {})
    records[3].bytes, records[3].checksum = size, checksum  # a shard rewritten with other values
    write_manifest(store.root, records, run_id=store.run["run_id"])
    assert ActivationStore(store.root).fingerprint != store.fingerprint
    assert ActivationStore(store.root).read(SITE, 192, 256).abs().sum() == 0


def test_workbench_verify_cli(tiny_model, tiny_model_dir, wikitext):
    from workbench.cli import cli

    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    ok = CliRunner().invoke(cli, ["verify", str(store.root)])
    assert ok.exit_code == 0 and ok.output.strip() == "ok: 4 shards verified"
    _flip_last_byte(_shard(store, 2))
    bad = CliRunner().invoke(cli, ["verify", str(store.root)])
    assert bad.exit_code == 2
    assert bad.output.strip() == (
        f"error: 1 of 4 shards in {store.root} are damaged (blocks.0.mlp.hook_post shard 2); "
        "re-run the same capture command to rewrite them"
    )
    capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert CliRunner().invoke(cli, ["verify", store.root.name[:8]]).output.strip() == "ok: 4 shards verified"


def test_missing_manifest_is_damage_and_the_rerun_rebuilds(tiny_model, tiny_model_dir, wikitext):
    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    good = store.read(SITE)
    (store.root / "manifest.parquet").unlink()
    with pytest.raises(StoreError, match="is damaged: run.json says the capture is complete but manifest"):
        ActivationStore(store.root)
    again = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert again.complete and again.n_rows == 256 and torch.equal(again.read(SITE), good)


def test_truncated_shard_of_a_complete_store_is_rewritten_by_the_rerun(tiny_model, tiny_model_dir, wikitext):
    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    good = store.read(SITE)
    _shard(store, 2).write_bytes(_shard(store, 2).read_bytes()[:100])
    again = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert again.complete and torch.equal(again.read(SITE), good) and again.verify() == []


def test_lost_run_json_or_a_kill_after_removing_token_parts_still_completes(
    tiny_model, tiny_model_dir, wikitext, monkeypatch
):
    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    tokens, good = store.tokens(), store.read(SITE)
    monkeypatch.setattr(capture_mod._Capture, "_forward_shard", None)  # nothing needs computing
    (store.root / "run.json").unlink()
    again = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert again.complete and again.tokens().equals(tokens) and again.shape(SITE) == [128]
    # killed after the parts were removed but before run.json said complete (the old order)
    run = (store.root / "run.json").read_text().replace('"complete"', '"running"')
    (store.root / "run.json").write_text(run)
    again = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert again.complete and again.tokens().equals(tokens) and torch.equal(again.read(SITE), good)


def test_finishing_refuses_a_store_with_missing_tokens(tiny_model, tiny_model_dir, wikitext, monkeypatch):
    real = capture_mod._Capture._write_tokens
    with monkeypatch.context() as patch:  # monkeypatch.undo() would also unset the test's WORKBENCH_HOME
        patch.setattr(
            capture_mod._Capture, "_write_tokens", lambda self, k, c: None if k == 2 else real(self, k, c)
        )
        with pytest.raises(
            StoreError, match="the tokens of .* cover 192 rows .* shards hold 256; the store was not"
        ):
            capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    [row] = list_stores()
    assert row["status"] == "partial" and row["rows"] == 0
    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)  # writes shard 2's
    seqs = store.tokens().column("seq").to_pylist()
    assert store.complete and seqs == [r // 32 for r in range(256)]


def test_failed_new_captures_leave_no_store_behind(
    tiny_model, tiny_model_dir, wikitext, tmp_path, workbench_home, monkeypatch
):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(StoreError, match="too short for one sequence of 32 tokens"):
        capture(_cfg(tiny_model_dir, str(short)), model=tiny_model, progress=False)
    monkeypatch.setattr(capture_mod, "write_safetensors", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    out = tmp_path / "empty-out"
    out.mkdir()
    with pytest.raises(StoreError):
        capture(_cfg(tiny_model_dir, str(short)), model=tiny_model, out=out, progress=False)
    assert list_stores() == [] and list((workbench_home / "stores").iterdir()) == []
    assert out.is_dir() and list(out.iterdir()) == []  # the user's folder stays, emptied of ours


def test_out_folder_that_is_not_a_store_is_refused_before_the_model_loads(
    tiny_model_dir, wikitext, tmp_path, monkeypatch
):
    import workbench.models

    monkeypatch.setattr(workbench.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "mine"
    (out / "tokens").mkdir(parents=True)
    (out / "tokens" / "notes.txt").write_text("keep me")
    (out / ".draft.tmp").write_text("keep me too")
    with pytest.raises(StoreError) as err:
        capture(_cfg(tiny_model_dir, wikitext), out=out, progress=False)
    assert str(err.value) == (
        f"{out} is not empty and is not an activation store; choose an empty or new folder for --out"
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        ".draft.tmp",
        "tokens",
        "tokens/notes.txt",
    ]


def test_cleanup_removes_only_the_stores_own_files(tiny_model, tiny_model_dir, wikitext, tmp_path):
    out = tmp_path / "store"
    capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=out, progress=False)
    planted = [out / ".notes.tmp", out / "acts" / SITE / ".mine.tmp", out / "tokens" / "readme.txt"]
    planted[2].parent.mkdir()
    for path in planted:
        path.write_text("user file")
    ours = out / "acts" / SITE / ".shard-00003.safetensors.a1b2c3d4.tmp"  # a killed writer's temp
    ours.write_text("x")
    (out / "acts" / SITE / "shard-00003.safetensors").unlink()
    capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=out, progress=False)
    assert all(p.read_text() == "user file" for p in planted) and not ours.exists()


def test_disk_full_is_one_line_and_the_store_resumes(tiny_model, tiny_model_dir, wikitext, monkeypatch):
    real, calls = capture_mod.write_safetensors, []

    def full_disk_at_shard_2(path, *args):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)

    with monkeypatch.context() as patch:  # monkeypatch.undo() would also unset the test's WORKBENCH_HOME
        patch.setattr(capture_mod, "write_safetensors", full_disk_at_shard_2)
        with pytest.raises(StoreError) as err:
            capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    [row] = list_stores()
    path = calls[2]
    assert (
        str(err.value) == f"disk full while writing {path}: free space and re-run the same command to resume"
    )
    assert path.name == "shard-00002.safetensors" and row["status"] == "partial"
    assert len(pq.read_table(path.parents[2] / "manifest.parquet")) == 2
    resumed = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    fresh = capture(
        _cfg(tiny_model_dir, wikitext), model=tiny_model, out=path.parents[3] / "fresh", progress=False
    )
    assert resumed.complete and torch.equal(resumed.read(SITE), fresh.read(SITE))


def test_store_files_are_group_readable(tiny_model, tiny_model_dir, wikitext, tmp_path):
    old = os.umask(0o002)
    try:
        store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=tmp_path / "s", progress=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(store.root)): p.stat().st_mode & 0o777 for p in store.root.rglob("*")}
    assert modes and all(m == (0o775 if (store.root / p).is_dir() else 0o664) for p, m in modes.items()), (
        modes
    )


def test_cli_capture_refuses_a_foreign_out_folder_before_loading(
    tiny_model_dir, wikitext, tmp_path, monkeypatch
):
    from workbench import api
    from workbench.cli import cli

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    args = ["capture", "--model", str(tiny_model_dir), "--data", wikitext, "--sites", SITE, "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {out} is not empty and is not an activation store; choose an empty or new folder for --out"
    )
    assert [p.name for p in out.iterdir()] == ["chapter1.tex"]


def test_a_complete_store_whose_tokens_lost_or_doubled_shards_is_repaired(
    tiny_model, tiny_model_dir, wikitext, monkeypatch
):
    """What two concurrent captures left before the lock: 'complete', with some shards' tokens."""
    import pyarrow as pa

    store = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    tokens = store.tokens()
    kept = pa.concat_tables([tokens.slice(192, 64), tokens.slice(64, 64), tokens.slice(64, 64)])
    pq.write_table(kept, store.root / "tokens.parquet")  # shard 3 once, shard 1 twice, 0 and 2 lost
    monkeypatch.setattr(capture_mod._Capture, "_forward_shard", None)  # tokens need no forward pass
    again = capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, progress=False)
    assert again.complete and again.tokens().equals(tokens)


def test_a_folder_that_lost_its_run_json_is_not_adopted_by_another_capture(
    tiny_model, tiny_model_dir, wikitext, tmp_path
):
    out = tmp_path / "store"
    capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=out, progress=False)
    (out / "run.json").unlink()
    other = _cfg(tiny_model_dir, wikitext, dtype="float16")
    with pytest.raises(
        StoreError, match=r"holds a different capture \(its run.json is missing\); choose another"
    ):
        capture(other, model=tiny_model, out=out, progress=False)
    assert capture(_cfg(tiny_model_dir, wikitext), model=tiny_model, out=out, progress=False).complete
