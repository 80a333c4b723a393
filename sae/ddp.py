"""Data-parallel training of one dictionary with `torch.distributed` (launched by `torchrun`).

    torchrun --nproc-per-node 2 -m workbench.sae.ddp --store <store> --site blocks.15.hook_resid_post \
        --arch topk --d-sae 4608 --k 32 --batch-size 1024

Takes the options of `workbench train-sae`. `--batch-size` is the GLOBAL batch: every rank draws the
same seeded shuffled store stream (`StoreStream`, same seed, same buffers) and rank r keeps the
contiguous rows [r·B/W, (r+1)·B/W) of each batch, so the ranks' slices are disjoint and together
are exactly the batch one process would train on. After `backward`, before SAELens' gradient
clipping and Adam step, each parameter's gradient is averaged over the ranks (all_reduce as it is
accumulated, as DDP does), and the dead-latent counters see the latents that fired on ANY rank.
Resampling dead latents draws from the global batch's rows (gathered) with the same seed on every
rank, so every rank re-initialises the same latents the same way.
Since SAELens' losses are means over the batch, W ranks with B/W rows each take the same step as
one process with B rows, up to float summation order (the mean of two half-batch means is not
bit-equal to one mean) — which can flip a TopK choice between two near-tied latents and so drift
further. BatchTopK's batch-wide threshold is taken per rank (over B/W rows), so it is NOT the
same run as one process; TopK, ReLU (standard), JumpReLU and transcoders are.

Rank 0 owns every write: the checkpoint (same format, so a killed torchrun resumes from it, or a
single process resumes a torchrun's checkpoint), the saved dictionary and the results cache.
The store (and $WORKBENCH_HOME) must be on a filesystem every rank sees. Backend: nccl when CUDA
is present (rank r uses GPU LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class RankDone(Exception):
    """Raised on ranks > 0 when training ends: rank 0 alone saves, scores and caches the result."""


@dataclass
class Parallel:
    """This process's place in the group, and the collectives the training loop needs."""

    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def attach(self, module: torch.nn.Module) -> None:
        """Start every rank from rank 0's weights and average each gradient as it is accumulated."""
        for p in module.parameters():
            dist.broadcast(p.data, src=0)
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._average)

    def _average(self, p: Tensor) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= self.world

    def slices(self, stream: Iterator[Tensor]) -> Iterator[Tensor]:
        """This rank's contiguous share of every global batch."""
        for batch in stream:
            share = len(batch) // self.world
            yield batch[self.rank * share : (self.rank + 1) * share]

    def fired_anywhere(self, fired: Tensor) -> Tensor:
        """[d_sae] bool: latents that fired on any rank this step."""
        counts = fired.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.bool()

    def sync_dead_counters(self, trainer, fired_here: Tensor) -> Tensor:
        """SAELens zeroed the steps-since-fired of this rank's firing latents; zero the others' too,
        so every rank trains AuxK on the same dead set. Returns the global fired mask."""
        fired = self.fired_anywhere(fired_here)
        trainer.n_forward_passes_since_fired[fired.to(trainer.n_forward_passes_since_fired.device)] = 0
        return fired

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows of `x`, in rank order: the global batch's rows, on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        dist.barrier()


def current() -> Parallel | None:
    """The process group this process belongs to, or None when training alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Parallel(dist.get_rank(), dist.get_world_size())


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch and must divide evenly over the {world} ranks"
        )


def launched_world() -> int:
    """WORLD_SIZE as torchrun set it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "workbench.sae.ddp is launched by torchrun (RANK and WORLD_SIZE are not set): "
            "torchrun --nproc-per-node N -m workbench.sae.ddp …"
        )
    return int(os.environ["WORLD_SIZE"])


def init() -> str:
    """Join the group torchrun describes in the environment; returns the backend."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return backend


def run_ranked(force: bool, options: dict) -> None:
    """Every rank builds the same `train-sae` run; rank 0 runs it through the cache (`api.run`),
    the others run the analysis up to the end of training (`RankDone`)."""
    from workbench import analysis, api, inputs, paths
    from workbench.context import Context

    if not options.get("store"):
        raise ValueError("torchrun training reads an existing store: pass --store (capture it first)")
    cfg = inputs.resolve_captured(api.make_config("train-sae", None, **options))
    check_batch(cfg.batch_size, launched_world())  # before the group forms: one line, no hang
    init()
    try:
        par = current() or Parallel(0, 1)
        if not par.leader:
            logging.disable(logging.WARNING)  # rank 0 says it once
        spec, key = analysis.get("train-sae"), api.key_for("train-sae", cfg)
        hit = [par.leader and not force and api._cached_result(api.cache(), spec, key) is not None]
        dist.broadcast_object_list(hit, src=0)  # a cache hit on rank 0 ends every rank
        if par.leader:
            from workbench.cli import _report

            _report(api.run("train-sae", force=force, **options), None)
        elif not hit[0]:
            try:
                spec.fn(cfg, Context(show_bars=False, work_dir=paths.home() / "work" / key[:16]))
            except RankDone:
                pass
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """`torchrun … -m workbench.sae.ddp <train-sae options>`; bad input is one `error:` line, exit 2."""
    import click

    from workbench import analysis
    from workbench.cli import _guard, _options_from

    spec = analysis.get("train-sae")
    force = click.Option(["--force"], is_flag=True, help="Retrain even if cached.")
    command = click.Command(
        "workbench.sae.ddp",
        callback=_guard(lambda force, **options: run_ranked(force, options)),
        params=[force, *_options_from(spec.config_cls)],
        help=__doc__,
    )
    command.main(args=argv, prog_name="torchrun … -m workbench.sae.ddp")


if __name__ == "__main__":  # run the imported module's main, so RankDone is the class train.py raises
    from workbench.sae.ddp import main as _main

    _main()
