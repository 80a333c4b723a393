"""Data-parallel training under `torchrun` (gloo on loopback): two ranks with half the batch each
train the same dictionary as one process with the whole batch (dead-latent resampling included),
resume a single process's checkpoint, and refuse a batch that does not split over the ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench import api
from workbench.sae.io import load_dictionary

SITE = "blocks.1.hook_resid_post"
# 2 ranks x 64 rows per step against 1 process x 128 rows. The difference is float summation
# order only (mean of two half-batch means vs one mean; gloo's sum), ~1e-7 relative per step,
# which Adam's per-coordinate normalisation can enlarge where a gradient is near zero, and which
# could flip a TopK choice between near-tied latents. Measured over 24 steps (lr 1e-3, d_sae 512,
# dead latents resampled): max |diff| 4.0e-7 on W_dec, 2.4e-8 on W_enc.
ATOL = 1e-4


def options(store) -> dict:
    return dict(
        store=str(store.root),
        site=SITE,
        arch="topk",
        d_sae=512,  # wide enough for latents to go silent, so resampling runs
        k=4,
        lr=1e-3,
        steps=24,
        batch_size=128,
        checkpoint_every=8,
        eval_tokens=256,
    )


def argv(opts: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(opts: dict, nproc: int = 2, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "workbench.sae.ddp",
        *argv(opts),
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def weights(folder: str) -> dict[str, torch.Tensor]:
    sae = load_dictionary(folder)
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        print(f"{name}: max |diff| {diff:.3g}")  # shown with -s: the measured gap
        assert diff <= ATOL, f"{name}: max |diff| {diff:.3g} > {ATOL}"


@pytest.fixture
def store(tiny_store):
    return tiny_store((SITE,), 4096)


def test_two_ranks_equal_one_process_with_the_whole_batch(store):
    opts = options(store)
    done = torchrun(opts)
    assert done.returncode == 0, done.stderr[-3000:]
    cached = api.run("train-sae", **opts)  # a cache hit: rank 0 stored the torchrun's result
    assert cached.steps == 24 and cached.tokens == 24 * 128
    ddp_weights = weights(cached.dictionary)
    single = api.run("train-sae", force=True, **opts)  # one process, 128 rows per step
    single_weights = weights(single.dictionary)
    assert_close(ddp_weights, single_weights)
    # resampling (on by default) drew from the global batch on every rank: the same latents
    assert cached.final["resampled"] == single.final["resampled"] > 0


def test_torchrun_resumes_a_single_process_checkpoint(store):
    opts = options(store)

    def interrupt(step: int, total: int) -> None:
        if step == 8:  # right after the first periodic checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.run("train-sae", progress=interrupt, **opts)
    done = torchrun(opts)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = api.run("train-sae", **opts)  # rank 0 cached it
    assert resumed.steps == 24
    resumed_weights = weights(resumed.dictionary)
    single = api.run("train-sae", force=True, **opts)
    assert_close(resumed_weights, weights(single.dictionary))


def ddp_main(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """The entry without torchrun: checks that fail before the process group forms."""
    return subprocess.run(
        [sys.executable, "-m", "workbench.sae.ddp", *args],
        capture_output=True,
        text=True,
        env={k: v for k, v in (os.environ | {"HF_HUB_OFFLINE": "1"} | env).items() if v},
    )


def test_a_batch_that_does_not_split_is_one_line(store):
    opts = options(store) | {"batch_size": 127}
    done = ddp_main(argv(opts), RANK="0", WORLD_SIZE="2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --batch-size 127 is the global batch and must divide evenly over the 2 ranks"
    )
    assert "Traceback" not in done.stderr


def test_without_a_store_or_torchrun_is_one_line(store):
    done = ddp_main(["--site", SITE])
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: torchrun training reads an existing store: pass --store (capture it first)"
    )
    done = ddp_main(argv(options(store)), RANK="", WORLD_SIZE="")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: workbench.sae.ddp is launched by torchrun (RANK and WORLD_SIZE are not set): "
        "torchrun --nproc-per-node N -m workbench.sae.ddp …"
    )
