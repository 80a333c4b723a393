"""Train while capturing: one dictionary trained straight from a capture in progress.

    from workbench.capture import CaptureConfig
    from workbench.sae.follow import capture_and_train
    out = capture_and_train(CaptureConfig(sites=("blocks.15.hook_resid_post",), n_tokens=1_000_000),
                            arch="topk", k=32, batch_size=1024)

The capture runs in a thread (same process, the pooled model) and writes the store as usual;
training runs in the caller's thread on `FollowStream`, which reads only committed shards and
waits for the next one. So the capture's forward passes and the optimiser steps overlap instead
of running one after the other (`workbench train-sae` on a finished store).

What differs from `train-sae` (which sees the whole store before its first step):
  * the first pass is `FollowStream`'s shuffle: shard groups in index order, rows permuted within
    a buffer of ≥ 16 batches — not a global shuffle; further passes (steps beyond one pass) are
    `StoreStream` epochs over the finished store;
  * input scaling (√d / E‖x‖) and b_dec (the mean) are measured on the first committed shard's
    kept rows, not on the whole training split; rows kept: not BOS, not a special token — no
    norm-outlier rule (its median needs the whole store) and no held-out split: score the
    dictionary afterwards with `workbench run sae-eval` on another store;
  * one site (an SAE, TopK by default); transcoders need two sites and are left to train-sae.
A killed run resumes: the capture resumes, and training restarts from its checkpoint, skipping
the batches it trained on (the follow stream's batches depend on the store and seed only).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from workbench import paths
from workbench.capture import CaptureConfig, capture, run_identity
from workbench.sae.archs import ArchSpec, build
from workbench.sae.data import FollowStream, StoreStream
from workbench.sae.io import dictionaries_dir, save_dictionary
from workbench.sae.train import LoopConfig, train
from workbench.store import ActivationStore

POLL_S = 0.2  # a shard of smollm2 at one site takes seconds to capture: polling costs nothing


@dataclass
class FollowOutcome:
    dictionary: str
    store: str
    site: str
    steps: int
    tokens: int
    seconds: float
    """Wall time from the capture's start to the saved dictionary (model load excluded)."""
    capture_seconds: float
    follow_batches: int
    """Batches trained on while following the capture (the first pass); the rest came from epochs."""
    waited_seconds: float
    """Time training spent waiting for the capture to commit the next shard."""
    scaling: float


class _Capture(threading.Thread):
    def __init__(self, cfg: CaptureConfig, model, out: Path):
        super().__init__(daemon=True, name="capture")
        self.cfg, self.model, self.out = cfg, model, out
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            capture(self.cfg, model=self.model, out=self.out, progress=False)
        except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
            self.error = err
        self.seconds = time.perf_counter() - t0

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def store_root(cfg: CaptureConfig, model) -> Path:
    """Where `capture(cfg)` writes: the content-addressed folder named by the run's identity."""
    from workbench import sites

    identity = run_identity(cfg, model, sites.resolve_for_model(cfg.sites, model))
    return paths.stores_dir() / paths.sha256_json(identity)[:16]


def special_ids(model) -> list[int]:
    """The tokenizer's structural special ids (SAELens' rule, as `sae.rows` uses)."""
    from sae_lens.util import get_special_token_ids

    return sorted(set(get_special_token_ids(model.tokenizer)))


def _first_rows(root: Path, site: str, specials: list[int], job: _Capture) -> Tensor:
    """Kept rows of shard 0 (waits for its commit): the sample scaling and b_dec are measured on."""
    while not (root / "run.json").exists():  # the capture thread is starting
        if not job.is_alive():
            job.check()
            raise ValueError(f"the capture into {root} ended before it began")
        time.sleep(0.05)
    stream = FollowStream(root, [site], 1, special_ids=specials)
    while True:
        job.check()
        store, complete = stream._committed(0)
        if store is not None:
            return stream._rows(store, 0)
        if complete or not job.is_alive():
            job.check()
            raise ValueError(f"the capture into {root} committed no shard")
        time.sleep(0.1)


def capture_and_train(
    cfg: CaptureConfig,
    arch: str = "topk",
    d_sae: int = 0,
    expansion: int = 8,
    k: int = 32,
    batch_size: int = 1024,
    lr: float = 3e-4,
    steps: int = 0,
    seed: int = 0,
    model=None,
    show_bar: bool = True,
) -> FollowOutcome:
    """Capture `cfg` (one site) and train a dictionary on it while it is written; `steps` 0 = one
    pass over the capture's non-BOS rows."""
    if len(cfg.sites) != 1:
        raise ValueError(f"train while capturing takes one site; got {', '.join(cfg.sites)}")
    cfg.preflight()
    if model is None:
        from workbench.context import POOL

        model = POOL.get(cfg.model, cfg.processing)
    cfg.check_model(model)
    root, t0 = store_root(cfg, model), time.perf_counter()
    job = _Capture(cfg, model, root)
    job.start()
    specials = special_ids(model)
    site = _resolved_site(cfg, model)
    first = _first_rows(root, site, specials, job)
    scale = math.sqrt(first.shape[-1]) / first.norm(dim=-1).mean().item()
    spec = ArchSpec(arch=arch, d_in=first.shape[-1], d_sae=d_sae or expansion * first.shape[-1], k=k)
    store = ActivationStore(root)
    sae = build(spec, _metadata(store, site, scale, seed), seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(first.mean(0) * scale)
    n_seqs = cfg.n_tokens // cfg.ctx_len
    steps = steps or max(1, n_seqs * (cfg.ctx_len - (cfg.bos == "prepend")) // batch_size)
    loop = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, dead_window_steps=max(1, steps // 10))
    follow = _Followed(root, site, batch_size, seed, specials, scale, job)
    work = paths.home() / "work" / f"follow-{root.name}-{arch}-{seed}"
    identity = {"store": root.name, "spec": vars(spec), "scale": scale, "seed": seed, "steps": steps}
    outcome = train(sae, follow.stream, loop, work, identity, show_bar=show_bar)
    job.join()
    job.check()
    if scale != 1.0:
        sae.fold_activation_norm_scaling_factor(scale)
    folder = save_dictionary(sae, dictionaries_dir() / work.name)
    return FollowOutcome(
        dictionary=str(folder),
        store=str(root),
        site=site,
        steps=outcome.steps_done,
        tokens=outcome.steps_done * batch_size,
        seconds=time.perf_counter() - t0,
        capture_seconds=job.seconds,
        follow_batches=follow.n_follow,
        waited_seconds=follow.waited,
        scaling=scale,
    )


def _resolved_site(cfg: CaptureConfig, model) -> str:
    from workbench import sites

    return sites.resolve_for_model(cfg.sites, model)[0]


def _metadata(store: ActivationStore, site: str, scale: float, seed: int) -> dict:
    from workbench.sae.compat import identity_metadata

    meta = identity_metadata(store.config, store.root) | {"hook_name": site}
    meta["workbench"] |= {"activation_scaling": [scale], "seed": seed, "trained_while_capturing": True}
    return meta


class _Followed:
    """`make_stream(start)` for `train`: the follow pass, then StoreStream epochs of the finished store."""

    def __init__(self, root, site, batch_size, seed, specials, scale, job: _Capture):
        self.args = (root, site, batch_size, seed, specials, scale)
        self.job, self.n_follow, self.waited = job, 0, 0.0

    def _wait(self, shard: int) -> None:
        self.job.check()  # a failed capture ends training instead of a wait forever
        self.waited += POLL_S

    def stream(self, start: int) -> Iterator[Tensor]:
        root, site, batch_size, seed, specials, scale = self.args
        follow = FollowStream(
            root, [site], batch_size, seed, specials, [scale], start=start, poll_s=POLL_S, on_wait=self._wait
        )
        yield from follow
        self.n_follow = follow.n_batches
        store = ActivationStore(root)  # complete now
        keep = _keep(store, specials)
        rest = StoreStream(
            store, [site], batch_size, seed, keep, [scale], start=max(0, start - follow.n_batches)
        )
        yield from rest


def _keep(store: ActivationStore, specials: list[int]) -> Tensor:
    keep = (
        store.positions() != 0
        if store.config.get("bos") == "prepend"
        else torch.ones(store.n_rows, dtype=torch.bool)
    )
    return keep & ~torch.isin(store.token_ids(), torch.tensor(specials, dtype=torch.int64))


def main(argv: list[str] | None = None) -> None:
    """`python -m workbench.sae.follow <capture options> --arch topk --k 32 --train-batch 1024`."""
    import click

    from workbench import sites
    from workbench.cli import _guard, _options_from

    def run(arch, d_sae, k, train_batch, lr, steps, seed, **capture_options) -> None:
        capture_options["sites"] = tuple(sites.split_patterns(capture_options["sites"]))
        out = capture_and_train(
            CaptureConfig(**capture_options),
            arch=arch,
            d_sae=d_sae,
            k=k,
            batch_size=train_batch,
            lr=lr,
            steps=steps,
            seed=seed,
        )
        click.echo(
            f"dictionary: {out.dictionary}  ({out.steps} steps, {out.tokens:,} tokens, {out.seconds:.0f} s; "
            f"waited {out.waited_seconds:.0f} s for the capture)\nstore: {out.store}"
        )

    train_options = [
        click.Option(
            ["--arch"], default="topk", show_default=True, help="Dictionary architecture (one site)."
        ),
        click.Option(["--d-sae"], type=int, default=0, help="Latents; 0 = 8 × d_in."),
        click.Option(
            ["--k"], type=int, default=32, show_default=True, help="Active latents per token (topk)."
        ),
        click.Option(["--train-batch"], type=int, default=1024, show_default=True, help="Tokens per step."),
        click.Option(["--lr"], type=float, default=3e-4, show_default=True),
        click.Option(["--steps"], type=int, default=0, help="0 = one pass over the captured non-BOS rows."),
        click.Option(["--seed"], type=int, default=0, show_default=True),
    ]
    command = click.Command(
        "workbench.sae.follow",
        callback=_guard(run),
        params=_options_from(CaptureConfig) + train_options,
        help=__doc__,
    )
    command.main(args=argv, prog_name="python -m workbench.sae.follow")


if __name__ == "__main__":
    main()
