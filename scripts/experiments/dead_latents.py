"""Dead-latent levers for the TopK SAE at a quarter run (data/sae_notes.md, "Two more levers").

    WORKBENCH_HOME=<scratch home> python scripts/experiments/dead_latents.py base|data|resample|sched [JSON overrides]

`base` is train-sae's defaults (resampling on since 2026-12-02: the notes' "recipe v2 as is" rows
are `base '{"resample_dead": false}'`). `data` starts W_dec at d_sae centred training rows (unit norm) and W_enc at W_decᵀ, by wrapping
the recipe's b_dec initialisation. `resample` wraps the trainer's step with
`sae.resample.resample_dead` every 1/8 of the run until 5/8 (the first version, run before
train-sae had the option; the option seeds each resampling by its step, so it draws other rows). The cache
key sees neither change, so run each variant in its own WORKBENCH_HOME (with `stores` and
`models` linked to the real ones). `sched` runs train-sae's resampling on the schedule set by the
overrides `_every` and `_until` (fractions of the run; default train-sae's 1/16 and 3/4); with
`resample_window_tokens` (a train-sae option; 1000000000 = the AuxK window) it decided train-sae's
defaults (data/sae_notes.md, "Resampling schedule").
Prints the run's summary.
"""

import json
import sys

import torch

from workbench import api, paths
from workbench.analyses import train_sae as T
from workbench.sae.data import sample_rows
from workbench.sae.resample import resample_dead

variant = sys.argv[1]
extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
centre_only = T.init_b_dec


def init(sae, store, site, keep, scale, method):
    centre_only(sae, store, site, keep, scale, method)
    if variant != "data":
        return
    rows = keep.nonzero().flatten()
    pick = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[: sae.W_dec.shape[0]]]
    mask = torch.zeros_like(keep)
    mask[pick] = True
    x = sample_rows(store, [site], len(pick), mask)[0] * scale - sae.b_dec.data.float()
    w = x / x.norm(dim=-1, keepdim=True)
    sae.W_dec.data.copy_(w.to(sae.W_dec.dtype))
    sae.W_enc.data.copy_(w.T.contiguous().to(sae.W_enc.dtype))


def with_resampling(make):
    def make_trainer(sae, loop):
        trainer = make(sae, loop)
        plain, every = trainer.step, max(1, loop.steps // 8)

        def step(batch):
            out = plain(batch)
            k = trainer.n_training_steps + 1  # the loop increments it after step()
            if k % every == 0 and k <= 5 * loop.steps // 8:
                print(
                    f"step {k}: resampled {int(resample_dead(trainer, out).sum())} dead latents", flush=True
                )
            return out

        trainer.step = step
        return trainer

    return make_trainer


def with_schedule(every_frac: float, until_frac: float):
    """train-sae's resampling every `every_frac` of the run until `until_frac` of it."""
    from workbench.sae import resample

    def due(step, steps):
        every = max(1, round(steps * every_frac))
        return step % every == 0 and step <= until_frac * steps

    resample.due = due


T.init_b_dec = init
if variant == "sched":  # resample_dead on the schedule in the overrides' _every and _until
    knobs = {k: extra.pop(k) for k in ("_every", "_until") if k in extra}
    extra["resample_dead"] = True
if variant == "resample":  # the first version, wrapping the trainer (train-sae's own resampling off)
    from workbench.sae import train as loop_module

    extra["resample_dead"] = False

    loop_module.make_trainer = with_resampling(loop_module.make_trainer)
store = str(paths.stores_dir() / "smollm2-L15-1M")
cfg = dict(d_sae=4608, lr=4e-4, batch_size=1024, checkpoint_every=1000, eval_tokens=8192, n_tokens=262144)
cfg |= dict(lr_decay_steps=50, seed=1) | extra
if variant == "sched":
    with_schedule(knobs.get("_every", 1 / 16), knobs.get("_until", 3 / 4))
result = api.run("train-sae", store=store, site="blocks.15.hook_resid_post", arch="topk", k=32, **cfg)
print(
    variant,
    sys.argv[2] if len(sys.argv) > 2 else "",
    json.dumps(extra),
    json.dumps(result.summary(), default=str),
)
