"""A prefilled workbench home for tests, benchmarks and screenshots (one small activation store and
the cached results that can be computed from it, through `workbench.api` only), and `serve()`, which
runs `workbench app` on a loopback port for browser tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workbench import api

SITES = ("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post")


def prefill(
    model: str, n_tokens: int = 512, ctx_len: int = 32, data: str | None = None, train: bool = False
) -> dict[str, Any]:
    """Capture a store from `model` into $WORKBENCH_HOME and cache activation-stats and layer-0 neuron
    dashboards on it; with `train`, also a small TopK SAE (train-sae) on the last layer's residual
    stream and its latent dashboards. Returns the store path, dictionary and cache keys."""
    cfg: dict[str, Any] = {"model": model, "sites": SITES, "n_tokens": n_tokens, "ctx_len": ctx_len}
    if data:
        cfg["data"] = data
    store = api.capture(progress=False, **cfg)
    out: dict[str, Any] = {"store": str(store.root), "keys": {}, "dictionary": ""}
    names = {a["name"] for a in api.list_analyses()}
    out["keys"]["activation-stats"] = api.run("activation-stats", store=out["store"]).cache_key
    if "dashboards" in names:
        neurons = api.run("dashboards", store=out["store"], site="blocks.0.mlp.hook_post", dictionary="")
        out["keys"]["dashboards"] = neurons.cache_key
    if train and {"train-sae", "dashboards"} <= names:
        site = [s for s in store.sites if s.endswith("hook_resid_post")][-1]
        sae = api.run(
            "train-sae",
            store=out["store"],
            site=site,
            arch="topk",
            expansion=2,
            k=8,
            steps=40,
            batch_size=64,
            eval_tokens=256,
            checkpoint_every=1000,
        )
        out["keys"]["train-sae"], out["dictionary"] = sae.cache_key, sae.dictionary
        latents = api.run("dashboards", store=out["store"], site=site, dictionary=sae.dictionary)
        out["keys"]["latent-dashboards"] = latents.cache_key
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(home: str | Path, port: int | None = None, timeout: float = 120) -> Iterator[str]:
    """Run `workbench app` on a loopback port with WORKBENCH_HOME=home; yields its base URL."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("workbench")
    cmd = (
        [str(exe), "app", "--port", str(port)]
        if exe.exists()
        else [sys.executable, "-m", "workbench.cli", "app", "--port", str(port)]
    )
    env = os.environ | {
        "WORKBENCH_HOME": str(home),
        "HF_HUB_OFFLINE": "1",  # `workbench app` itself serves on loopback without a file watcher
    }
    log = open(Path(home) / "app.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`workbench app` exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"`workbench app` did not answer on {url} within {timeout} s")


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
