"""Distributed capture on a real local Ray cluster (loopback, 2 CPUs): a store written by two
actors is byte-identical to a single-process capture; a driver stopped mid-run resumes; a worker
killed mid-shard has its shard rerun; bad addresses, folders and packages are one line first."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ray_cluster import ray_cluster  # noqa: F401 - the module's cluster fixture, used by name

from workbench.capture import CaptureConfig, capture
from workbench.distributed.ray_capture import capture_on_ray
from workbench.distributed.ray_engine import RayEngineError, check_workers
from workbench.store import ActivationStore


def _config(model_dir: Path, text: str) -> CaptureConfig:
    # 48 sequences of 32 tokens, 8 per shard: 6 shards, two sites in one layer, one in another
    return CaptureConfig(
        model=str(model_dir),
        data=text,
        n_tokens=1536,
        ctx_len=32,
        sites=("blocks.*.hook_resid_post", "blocks.0.mlp.hook_post"),
        batch_size=4,
        shard_tokens=256,
    )


@pytest.fixture(scope="module")
def local_store(tiny_model_dir, wikitext, tmp_path_factory) -> Path:
    """The single-process reference, with one thread as each Ray actor has (num_cpus=1): the
    matmuls then sum in the same order, so equal bytes are the right expectation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("local") / "store"
        capture(_config(tiny_model_dir, wikitext), out=out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a store but run.json (it holds timestamps) and the lock."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("run.json", ".lock")
    }


def _assert_same_store(root: Path, reference: Path) -> None:
    ours, theirs = _files(root), _files(reference)
    assert sorted(ours) == sorted(theirs)  # no temp file, no token part left behind
    assert [name for name in ours if ours[name] != theirs[name]] == []
    store = ActivationStore(root)
    assert store.complete and store.n_rows == 1536 and store.verify() == []
    assert store.run["shapes"] == ActivationStore(reference).run["shapes"]


class _Stop(Exception):
    pass


@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_equal_local_capture_and_driver_resumes(tiny_model_dir, wikitext, local_store, tmp_path):
    cfg, out = _config(tiny_model_dir, wikitext), tmp_path / "ray"

    def stop_after_two(done: int, total: int) -> None:  # the driver dies after two commits
        if done >= 2 * 256:
            raise _Stop

    with pytest.raises(_Stop):
        capture_on_ray(cfg, out=out, workers=2, progress=stop_after_two)
    kept = {r.shard: r.checksum for r in ActivationStore(out).records("blocks.0.hook_resid_post")}
    assert len(kept) >= 2 and not ActivationStore(out).complete
    stamps = {p: p.stat().st_mtime_ns for p in (out / "acts").rglob("shard-*") if int(p.stem[-5:]) in kept}

    store = capture_on_ray(cfg, out=out, workers=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # committed shards were not redone
    _assert_same_store(store.root, local_store)


@pytest.mark.usefixtures("ray_cluster")
def test_worker_killed_mid_shard_is_rerun(tiny_model_dir, wikitext, local_store, tmp_path):
    out, marker = tmp_path / "ray", tmp_path / "killed-once"

    def die_once_at_shard_3(shard: int, root: str) -> None:
        """Runs in the actor once shard 3's files are written: plant a torn temp file (as a write
        cut short leaves) and exit the process before the shard is reported."""
        if shard == 3 and not marker.exists():
            marker.write_text(str(os.getpid()))
            torn = Path(root) / "acts" / "blocks.1.hook_resid_post" / ".shard-00003.safetensors.0badc0de.tmp"
            torn.write_bytes(b"\0" * 1000)
            os._exit(1)

    store = capture_on_ray(
        _config(tiny_model_dir, wikitext), out=out, workers=2, progress=False, after_write=die_once_at_shard_3
    )
    assert marker.exists()  # the worker did die at shard 3
    _assert_same_store(store.root, local_store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_line_before_any_work(tiny_model_dir, wikitext, tmp_path):
    from workbench.cli import cli

    port = _free_port()  # nothing listens there
    address = f"127.0.0.1:{port}"
    with pytest.raises(RayEngineError) as err:
        capture_on_ray(_config(tiny_model_dir, wikitext), out=tmp_path / "s", address=address)
    assert str(err.value) == (
        f"cannot reach a Ray cluster at {address}: Connection refused; start one there with "
        f"`ray start --head --port {port}`, or leave out --address to run on this machine"
    )
    assert not (tmp_path / "s").exists()
    args = ["capture", "--engine", "ray", "--address", address, "--model", str(tiny_model_dir)]
    result = CliRunner().invoke(cli, [*args, "--data", wikitext, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: {err.value}"


def test_workers_check_paths_and_packages(ray_cluster, tmp_path):  # noqa: F811 - the fixture
    (node,) = [n["NodeManagerAddress"] for n in ray_cluster.nodes() if n["Alive"]]
    missing = tmp_path / "not-mounted"
    with pytest.raises(RayEngineError) as err:
        check_workers([("the store folder", str(missing))], [])
    assert str(err.value) == (
        f"Ray worker on {node}: the store folder {missing} is not visible here; "
        "put it on a filesystem every node mounts at the same path"
    )
    with pytest.raises(RayEngineError) as err:
        check_workers(
            [("the store folder", str(tmp_path))], [("no_such_module_r1", "pip install no-such-r1")]
        )
    assert str(err.value) == (
        f"Ray worker on {node}: cannot import no_such_module_r1: install it there with `pip install no-such-r1`"
    )
    check_workers([("the store folder", str(tmp_path))], [("workbench", "-"), ("transformer_lens", "-")])
