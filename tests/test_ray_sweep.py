"""A sweep of two dictionaries on a real local Ray cluster: each is an ordinary cached train-sae
run in a Ray worker, in the cache when reported, with the same weights as training it locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray_cluster import ray_cluster  # noqa: F401 - the module's cluster fixture, used by name
from safetensors.torch import load_file

from workbench import api
from workbench.store import StoreError


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.dictionary) / "sae_weights.safetensors")


@pytest.mark.usefixtures("ray_cluster")
def test_sweep_of_two_dictionaries_equals_local_training(tiny_store, tmp_path, monkeypatch):
    store = tiny_store(("blocks.1.hook_resid_post",), 1024)
    base = dict(store=str(store.root), arch="topk", d_sae=128, batch_size=128, steps=12, lr=3e-3)
    configs = [{**base, "k": 4}, {**base, "k": 8}]
    reported = []  # each run is loadable from the cache at the moment it is reported
    runs = api.sweep("train-sae", configs, engine="ray", on_done=lambda r: reported.append(api.load(r.key)))
    assert sorted(r.cache_key for r in reported) == sorted(r.key for r in runs)
    assert [r.overrides["k"] for r in runs] == [4, 8]
    on_ray = [api.load(r.key) for r in runs]

    # The same configs trained here, in a fresh home (no cache hit), with one thread as a Ray
    # worker has (num_cpus=1): the same sums in the same order, so equal weights are expected.
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "local-home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = [api.run("train-sae", **c) for c in configs]
    finally:
        torch.set_num_threads(threads)
    for ray_result, local_result in zip(on_ray, local):
        assert ray_result.cache_key == local_result.cache_key
        ray_w, local_w = _weights(ray_result), _weights(local_result)
        assert ray_w.keys() == local_w.keys() and set(ray_w) >= {"W_enc", "W_dec", "b_enc", "b_dec"}
        for name in local_w:
            assert torch.equal(ray_w[name], local_w[name]), name
    assert not torch.equal(_weights(local[0])["W_enc"], _weights(local[1])["W_enc"])  # two dictionaries


def test_sweep_checks_every_config_first(tmp_path):
    with pytest.raises(ValueError, match="at least one config"):
        api.sweep("train-sae", [], engine="ray")
    with pytest.raises(StoreError) as err:  # before Ray is touched
        api.sweep(
            "train-sae", [{"store": str(tmp_path), "k": 4}, {"store": str(tmp_path / "none")}], engine="ray"
        )
    assert str(err.value) == (
        f"no activation store at {tmp_path} (run.json missing); capture one with `workbench capture`"
    )


def test_grid_and_its_errors():
    from click.testing import CliRunner

    from workbench.cli import cli
    from workbench.distributed.ray_sweep import grid

    configs = grid("train-sae", ["k=4,8", "d-sae=64,128"], ["store=/s", "normalize=false"])
    assert configs == [
        {"store": "/s", "normalize": False, "k": k, "d_sae": d} for k in (4, 8) for d in (64, 128)
    ]
    for args, message in (
        (["--vary", "kk=1,2"], "'kk=1,2' is not NAME=VALUE with NAME an option of train-sae (e.g. k=16,32)"),
        (["--vary", "k=a,2"], "k takes int values, got 'a' in 'k=a,2'"),
    ):
        result = CliRunner().invoke(cli, ["sweep", "train-sae", *args])
        assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == f"error: {message}"
