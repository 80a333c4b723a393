"""Continuous sparsification of a weight mask towards the bigram distribution (Chang & Bergen 2025).

Every maskable weight w_k (attention and MLP matrices, `workbench.masks`) gets a logit s_k, 0 at
the start (soft mask 0.5); the forward pass uses w_k · σ(T·s_k) (Savarese et al. 2020,
"Winning the lottery with continuous sparsification"). The loss is

    L(s) = mean over positions of CE(P_bigram(· | x_t), softmax(logits_masked(x)_t)) + (λ/N)·Σ_k σ(T·s_k)

with N the number of mask entries, minimised by AdamW; T = growth^step (the reference multiplies T
by 1.001 after every optimiser step). Training stops early once the undecided entries
(0.1 < σ(T·s) < 0.9) are fewer than `stop_undecided` × the entries above 0.9, as the reference's
`train_circuit` does; the hard mask is s > 0. Entries whose weight is exactly 0 start at −1e6
(dropped), also as the reference.

The logits live in ONE flat fp32 Parameter (one AdamW tensor, not 210 small ones); the pooled
model is used through `masks.swapped`, so its Parameters are never written and their
`requires_grad` flags are restored on exit. Checkpoints (logits, AdamW state, step, curves) are
written atomically every `checkpoint_every` steps and on Ctrl-C; a resumed run continues with the
same batches (a pure function of seed and step) and equals an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from workbench import masks
from workbench.interventions import model_lock

CURVES = ("step", "loss", "ce", "kept", "undecided", "temperature")
"""Per logged step; kept / undecided: fractions of entries with σ(T·s) > 0.9 / in (0.1, 0.9) before it."""
DROPPED = -1e6  # logit of an entry whose weight is exactly 0: σ(T·s) = 0 at every T


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one mask-training run (defaults: the paper's, except steps/batch)."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-5
    lam: float = 10.0
    temp_growth: float = 1.001
    weight_decay: float = 0.01  # torch AdamW's default, which the reference uses
    stop_undecided: float = 0.01
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0


@dataclass
class TrainOutcome:
    mask: masks.MaskSet
    curves: dict[str, Tensor]
    steps_done: int
    stopped_early: bool
    seconds: float
    resumed_from: int


class MaskLogits:
    """The flat logit vector s [N] and its per-matrix views (HF name -> [out, in])."""

    def __init__(self, weights: dict[str, Tensor]):
        self.names = list(weights)
        self.shapes = {n: tuple(w.shape) for n, w in weights.items()}
        self.sizes = {n: weights[n].numel() for n in self.names}
        sizes = list(self.sizes.values())
        self.n = sum(sizes)
        flat = torch.cat([(weights[n].detach() == 0).flatten() for n in self.names])
        self.s = torch.nn.Parameter(torch.where(flat, DROPPED, 0.0).float())

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """name -> [out, in] view of `flat` (the logits, or σ(T·s)), no copy. One `split`, not a
        slice per matrix: each slice's backward fills a zero tensor of all N entries (210 of them
        on smollm2, ~22G writes per step), the split's backward concatenates once."""
        parts = flat.split([self.sizes[n] for n in self.names])
        return {n: part.view(self.shapes[n]) for n, part in zip(self.names, parts)}

    def hard(self) -> masks.MaskSet:
        return masks.MaskSet({n: v.detach() > 0 for n, v in self.views(self.s).items()})


def make_optimizer(s: Tensor, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the flat logits; fused: 11x faster than the default loop on CPU (20M entries)."""
    return torch.optim.AdamW([s], lr=settings.lr, weight_decay=settings.weight_decay, fused=True)


@contextmanager
def frozen(model) -> Iterator[None]:
    """No gradient flows into the model's own parameters (flags restored on exit)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def masked_loss(model, weights, logits: MaskLogits, soft: Tensor, tokens: Tensor, target, specials):
    """Mean CE(P_bigram ‖ masked model) over all positions of `tokens` [batch, pos]."""
    views = logits.views(soft)
    with masks.swapped(model, {n: weights[n] * views[n] for n in logits.names}):
        out = model(tokens)  # [batch, pos, vocab]
    log_q = out[..., : target.vocab_size].flatten(0, 1).log_softmax(-1)
    prev = target.contexts(tokens.flatten(), specials)
    return target.cross_entropy(prev, log_q).mean()


class Checkpointer:
    """logits.safetensors + optimizer.pt + state.json in `root/checkpoint`, replaced atomically."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "checkpoint"

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def save(self, s: Tensor, optimizer, state: dict) -> None:
        tmp = self.dir.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({"s": s.detach().contiguous()}, str(tmp / "logits.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, s: Tensor, optimizer, identity: dict) -> dict:
        state = json.loads((self.dir / "state.json").read_text())
        if state.get("identity") != identity:
            raise RuntimeError(f"{self.dir} belongs to a different training run; delete it to start over")
        with torch.no_grad():
            s.copy_(load_file(str(self.dir / "logits.safetensors"))["s"])
        optimizer.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True))
        return state


def batches(sequences: Tensor, batch_size: int, seed: int, start: int) -> Iterator[Tensor]:
    """Batch `step` for step = start, start+1, …: epochs of a seeded permutation of the rows."""
    n, perms = len(sequences), {}
    step = start
    while True:
        rows = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            epoch = p // n
            if epoch not in perms:
                perms = {
                    epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
                }
            rows.append(perms[epoch][p % n])
        yield sequences[torch.stack(rows)]
        step += 1


def undecided_counts(soft: Tensor) -> tuple[int, int]:
    """(entries with 0.1 < σ < 0.9, entries with σ > 0.9); count_nonzero: 4x faster than a bool sum."""
    above = int(torch.count_nonzero(soft > 0.9))
    return int(torch.count_nonzero(soft > 0.1)) - above, above


def _step(model, weights, logits, optimizer, settings, step, tokens, target, specials) -> dict | None:
    """One optimiser step at T = growth^step; None (no step) when the early-stop rule holds:
    undecided entries (0.1 < σ < 0.9) fewer than `stop_undecided` × entries above 0.9. The rule is
    checked on logged steps only (every `log_every`): counting N entries costs as much as a
    fifth of a step on smollm2."""
    temperature = settings.temp_growth**step
    soft = torch.sigmoid(temperature * logits.s)  # [N]
    logged = (step + 1) % settings.log_every == 0 or step + 1 == settings.steps
    undecided, above = undecided_counts(soft.detach()) if logged else (-1, -1)
    if logged and undecided < settings.stop_undecided * above:
        return None
    ce = masked_loss(model, weights, logits, soft, tokens, target, specials)
    loss = ce + settings.lam / logits.n * soft.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "step": step + 1,
        "loss": loss.item(),
        "ce": ce.item(),
        "kept": above / logits.n,
        "undecided": undecided / logits.n,
        "temperature": temperature,
    }


def train(
    model,
    target,
    sequences: Tensor,
    settings: TrainSettings,
    work_dir: Path,
    identity: dict,
    specials: list[int | None] = (),
    show_bar: bool = True,
    callback: Callable[[int, int], None] | None = None,
    stop_after: int | None = None,
) -> TrainOutcome | None:
    """Train (or resume) the mask on `sequences` [n_seq, pos]; None when stopped by `stop_after` (tests).

    `target` is a `workbench.bigram.BigramModel` (its `cross_entropy` and `contexts`); `identity`
    (the run's config) must match a checkpoint's for it to be resumed."""
    weights = {n: w.detach() for n, w in masks.maskable(model).items()}
    logits = MaskLogits(weights)
    optimizer = make_optimizer(logits.s, settings)
    ckpt = Checkpointer(work_dir)
    state = ckpt.load(logits.s, optimizer, identity) if ckpt.exists() else {}
    start, curves = state.get("step", 0), state.get("curves", {k: [] for k in CURVES})
    t0 = time.perf_counter() - state.get("seconds", 0.0)
    step, stopped = start, False
    bar = tqdm(
        total=settings.steps, initial=start, unit="step", desc="train bigram mask", disable=not show_bar
    )

    def save() -> None:
        record = {"step": step, "seconds": time.perf_counter() - t0, "identity": identity, "curves": curves}
        ckpt.save(logits.s, optimizer, {**record, "settings": asdict(settings)})

    stream = batches(sequences, settings.batch_size, settings.seed, start)
    consistent = True  # the logits and `step` agree (a Ctrl-C between them keeps the last checkpoint)
    try:
        with model_lock(model), frozen(model):  # the whole run: no other run interleaves
            while step < settings.steps:
                consistent = False
                row = _step(model, weights, logits, optimizer, settings, step, next(stream), target, specials)
                if row is None:  # nothing changed: no step taken
                    stopped = consistent = True
                    break
                step, consistent = step + 1, True
                if step % settings.log_every == 0 or step == settings.steps:
                    for k in CURVES:
                        curves[k].append(row[k])
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "kept", "undecided")})
                bar.update(1)
                if callback:
                    callback(step, settings.steps)
                if step % settings.checkpoint_every == 0 and step < settings.steps:
                    save()
                if stop_after is not None and step - start >= stop_after:
                    save()
                    return None
    except KeyboardInterrupt:
        if consistent:
            save()
        raise
    finally:
        bar.close()
    mask = logits.hard()
    mask.meta.update(steps_done=str(step), stopped_early=str(stopped))
    curves_t = {k: torch.tensor(v, dtype=torch.float64) for k, v in curves.items()}
    return TrainOutcome(mask, curves_t, step, stopped, time.perf_counter() - t0, start)
