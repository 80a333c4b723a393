"""Train a dictionary from the activation store with SAELens' `SAETrainer` (never re-running the model).

We drive SAELens' public step seam (`SAETrainer.step`: Adam, lr schedule, coefficient warm-up,
dead-latent counters, grad clipping at 1) from our own loop, which adds:
  * batches from `StoreStream` (seeded shuffle, BOS rows dropped, resumable at any batch);
  * SAELens-style input scaling (`expected_average_only_in`: x · √d_in / E‖x‖, measured on the
    store, recorded, and folded into the weights at the end so the saved dictionary reads raw
    activations);
  * decoder constraints after each optimiser step (unit-norm atoms for MP-SAE and top-AFA);
  * checkpoints in SAELens' layout (`cfg.json`, `sae_weights.safetensors`, `trainer_state.pt`)
    plus our `state.json` (step, stream position, curves) — written atomically every
    `checkpoint_every` steps and on Ctrl-C, so a killed run resumes with an identical next step;
  * a tqdm bar with tokens/s and live L0/FVU, and training curves as tensors;
  * AuxK bookkeeping: the aux loss per logged step, and which latents were ever dead by the
    trainer's window (no firing for `dead_window_steps` steps) and fired again afterwards
    ("revived"), so a run shows whether AuxK did its job.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sae_lens import SAETrainer, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepOutput
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from workbench.models import resolve_device
from workbench.sae import ddp, resample
from workbench.sae.archs import post_step
from workbench.sae.data import StoreStream

CURVES = ("step", "tokens", "loss", "mse", "aux_loss", "l0", "fvu", "frac_dead_window", "revived", "lr")


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one training run."""

    steps: int
    batch_size: int
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    dead_window_steps: int = 200
    checkpoint_every: int = 200
    log_every: int = 10
    resample_dead: bool = False  # sae.resample: re-initialise dead latents every 1/16 of the run until 3/4
    resample_window_steps: int = 0  # silent this many steps = resampled; 0 = dead_window_steps


@dataclass
class TrainOutcome:
    sae: TrainingSAE
    curves: dict[str, torch.Tensor]
    steps_done: int
    seconds: float
    resumed_from: int
    ever_dead: Tensor
    """[d_sae] bool: dead by the training window at some step."""
    revived: Tensor
    """[d_sae] bool: fired at a step when it was dead by the window (AuxK's purpose)."""
    resampled: Tensor
    """[d_sae] bool: re-initialised by `resample_dead` at least once."""


def make_trainer(sae: TrainingSAE, loop: LoopConfig) -> SAETrainer:
    cfg = SAETrainerConfig(
        total_training_samples=loop.steps * loop.batch_size,
        train_batch_size_samples=loop.batch_size,
        lr=loop.lr,
        lr_end=loop.lr / 10,
        lr_warm_up_steps=loop.lr_warm_up_steps,
        lr_decay_steps=loop.lr_decay_steps,
        adam_beta1=loop.adam_beta1,
        adam_beta2=loop.adam_beta2,
        dead_feature_window=loop.dead_window_steps,
        feature_sampling_window=max(loop.steps, 1),
    )
    return SAETrainer(cfg, sae, data_provider=iter(()))


@torch.no_grad()
def step_metrics(out: TrainStepOutput) -> dict[str, float]:
    """L0 and FVU = ‖x − x̂‖² / ‖x − mean(x)‖² of one batch (in the training scale; FVU is scale-free)."""
    x, x_hat = out.sae_in.float(), out.sae_out.float()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
    return {
        "loss": out.loss.item(),
        "mse": out.losses["mse_loss"].item(),
        "aux_loss": float(out.losses.get("auxiliary_reconstruction_loss", 0.0)),
        "l0": (out.feature_acts != 0).float().sum(-1).mean().item(),
        "fvu": fvu.item(),
    }


class Checkpointer:
    """SAELens checkpoint files + our state.json in `root/checkpoint`, replaced atomically."""

    def __init__(self, root: Path):
        self.dir = root / "checkpoint"

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def save(
        self, trainer: SAETrainer, state: dict, curves: dict[str, list[float]], latents: dict[str, Tensor]
    ) -> None:
        tmp = self.dir.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.sae.save_model(tmp)  # training form: cfg.json + sae_weights.safetensors (+ buffers)
        trainer.save_trainer_state(tmp)  # optimizer, scheduler, dead-latent counters
        save_file(
            {k: torch.tensor(v, dtype=torch.float64) for k, v in curves.items()}, tmp / "curves.safetensors"
        )
        save_file(latents, tmp / "latents.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, trainer: SAETrainer) -> tuple[dict, dict[str, list[float]], dict[str, Tensor]]:
        trainer.sae.load_weights_from_checkpoint(self.dir)
        trainer.load_trainer_state(self.dir)
        curves = {k: v.tolist() for k, v in load_file(self.dir / "curves.safetensors").items()}
        latents = load_file(self.dir / "latents.safetensors")
        return json.loads((self.dir / "state.json").read_text()), curves, latents


def _record(
    trainer: SAETrainer, out: TrainStepOutput, step: int, loop: LoopConfig, curves: dict, revived: Tensor
) -> dict:
    """Append one row of training curves; returns it."""
    m = step_metrics(out)
    m.update(step=step, tokens=step * loop.batch_size, lr=trainer.optimizer.param_groups[0]["lr"])
    m["frac_dead_window"] = trainer.dead_neurons.float().mean().item()
    m["revived"] = float(revived.sum())
    for k in CURVES:
        curves[k].append(m[k])
    return m


def _resume(
    trainer: SAETrainer, ckpt: Checkpointer, identity: dict
) -> tuple[int, float, dict[str, list[float]], dict[str, Tensor]]:
    """(start step, seconds already spent, curves, latent masks) from the checkpoint, or a fresh start."""
    if not ckpt.exists():
        d_sae = trainer.sae.cfg.d_sae
        fresh = {
            "ever_dead": torch.zeros(d_sae, dtype=torch.bool),
            "revived": torch.zeros(d_sae, dtype=torch.bool),
            "resampled": torch.zeros(d_sae, dtype=torch.bool),
        }
        return 0, 0.0, {k: [] for k in CURVES}, fresh
    state, curves, latents = ckpt.load(trainer)
    latents.setdefault("resampled", torch.zeros_like(latents["revived"]))  # absent in older checkpoints
    if state.get("identity") != identity:
        raise RuntimeError(f"{ckpt.dir} belongs to a different training run; delete it to start over")
    return state["step"], state["seconds"], curves, latents


def _resample(trainer: SAETrainer, out: TrainStepOutput, loop: LoopConfig, step: int, par, latents) -> int:
    """Re-initialise the latents silent for the resampling window (sae.resample); returns how many."""
    seeded = torch.Generator().manual_seed(step)  # a resumed run (and every rank) draws alike
    silent = trainer.n_forward_passes_since_fired > (loop.resample_window_steps or loop.dead_window_steps)
    gather = par.gather_rows if par is not None else None
    new = resample.resample_dead(trainer, out, seeded, silent, gather).cpu()
    latents["resampled"] |= new
    return int(new.sum())


def train(
    sae: TrainingSAE,
    make_stream: Callable[[int], StoreStream],
    loop: LoopConfig,
    work_dir: Path,
    identity: dict,
    show_bar: bool = True,
    callback: Callable[[int, int], None] | None = None,
    stop_after: int | None = None,
) -> TrainOutcome | None:
    """Run (or resume) `loop.steps` steps; returns None when stopped early by `stop_after` (tests).

    `make_stream(start)` gives the batch stream positioned at batch `start`; `identity` (the run's
    config) must match a checkpoint's for it to be resumed.
    """
    sae.to(resolve_device())  # --device (default: CUDA when present); batches follow in trainer.step
    trainer, ckpt = make_trainer(sae, loop), Checkpointer(Path(work_dir))
    start, elapsed, curves, latents = _resume(trainer, ckpt, identity)
    stream = make_stream(start)
    par = ddp.current()  # under torchrun: this rank's slice of each batch, gradients averaged
    if par is not None:
        ddp.check_batch(loop.batch_size, par.world)
        par.attach(sae)
        stream, show_bar = par.slices(stream), show_bar and par.leader
    desc = f"train {sae.cfg.architecture()}"
    bar = tqdm(total=loop.steps, initial=start, unit="step", desc=desc, disable=not show_bar)
    t0 = time.perf_counter() - elapsed
    tick, step, consistent = time.perf_counter(), start, True

    def save(sync: bool = True) -> None:
        state = {
            "step": step,
            "seconds": time.perf_counter() - t0,
            "identity": identity,
            "loop": asdict(loop),
        }
        if par is None or par.leader:  # one writer; the others wait so a resume finds it whole
            ckpt.save(trainer, state, curves, latents)
        if par is not None and sync:
            par.barrier()

    try:
        while step < loop.steps:
            consistent = False  # weights may run ahead of `step` until the counters catch up
            dead = trainer.dead_neurons.clone()  # the mask AuxK trains on in this step
            out = trainer.step(next(stream))
            trainer.n_training_steps += 1
            fired = out.feature_acts.detach().bool().any(0)
            if par is not None:
                fired = par.sync_dead_counters(trainer, fired)
            latents["ever_dead"] |= dead.cpu()
            latents["revived"] |= (dead & fired).cpu()
            post_step(sae)
            step, consistent = step + 1, True
            if loop.resample_dead and resample.due(step, loop.steps):
                n = _resample(trainer, out, loop, step, par, latents)
                bar.write(f"step {step}: resampled {n} latents", file=sys.stderr)  # stdout may be --json
            if step % loop.log_every == 0 or step == loop.steps:
                m = _record(trainer, out, step, loop, curves, latents["revived"])
                now = time.perf_counter()
                tok_s = loop.log_every * loop.batch_size / (now - tick)
                bar.set_postfix(tok_s=f"{tok_s:.0f}", l0=f"{m['l0']:.1f}", fvu=f"{m['fvu']:.3f}")
                tick = now
            bar.update(1)
            if callback:
                callback(step, loop.steps)
            if step % loop.checkpoint_every == 0 and step < loop.steps:
                save()
            if stop_after is not None and step - start >= stop_after:
                save()
                return None
    except KeyboardInterrupt:
        if consistent:  # otherwise the last periodic checkpoint stands
            save(sync=False)
        raise
    finally:
        bar.close()
    if par is not None and not par.leader:
        raise ddp.RankDone
    seconds = time.perf_counter() - t0
    curves_t = {k: torch.tensor(v) for k, v in curves.items()}
    return TrainOutcome(
        sae, curves_t, step, seconds, start, latents["ever_dead"], latents["revived"], latents["resampled"]
    )
