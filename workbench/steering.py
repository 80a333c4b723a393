"""Steering vectors: add α·v/‖v‖ at one hook site at every position, with α calibrated to a target KL.

    with steered(model, "blocks.15.mlp.hook_post", v, alpha=4.0):
        logits = model(tokens)
    cal = calibrate_alpha(model, prompts, v, "blocks.15.mlp.hook_post", target_kl=0.1, sign=+1)

As in Shafran, Geiger, Geva 2025 ("Decomposing MLP activations into interpretable features via
semi-nonnegative matrix factorization", arXiv 2506.10920; their `intervener.py`): the unit
direction is added at **every position** (BOS included) of the hooked site. An SNMF feature
F[:,k] lives in neuron space, so it is added at `blocks.N.mlp.hook_post` (what W_out reads); any
other direction (an SAE decoder row, a difference of means) is added at the site it was read from.

Steering strength is matched by its effect, not by α: `calibrate_alpha` finds α such that the mean
KL(plain ‖ steered) of the next-token distributions, averaged over **every position of every
calibration prompt** (BOS prepended, padding excluded), is within `rel_tol` (10 %) of the target.
KL(α) grows with |α| (it is 0 at α = 0), so α is bracketed by doubling and then refined by
bisection in log α. Hooks live in `workbench.interventions.hooked`: scoped, thread-owned, under the
model's lock; no weight changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float

from workbench.interventions import hook_points, hooked

KL_TARGETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5)
"""The paper's target KL values (both signs are steered)."""
REL_TOL = 0.1
"""Calibration stops when |KL − target| ≤ REL_TOL · target."""
MAX_EVALS = 40
"""Most KL evaluations one calibration may spend (bracketing + bisection)."""


class SteeringError(ValueError):
    """Steering that cannot be done (zero direction, wrong width, unreachable KL); one readable line."""


def unit(direction: torch.Tensor) -> torch.Tensor:
    """v/‖v‖ as float32; a zero or non-finite direction is refused."""
    v = direction.detach().float().flatten()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SteeringError("the steering direction is zero or not finite")
    return v / norm


@contextmanager
def steered(model, site: str, direction: torch.Tensor, alpha: float) -> Iterator[None]:
    """Inside the block, every forward pass of `model` adds alpha · v/‖v‖ at `site`, every position.

    The hook adds to the activation's last dimension ([batch, pos, d]); a width mismatch is a
    SteeringError on the first forward pass."""
    v = unit(direction)
    points = hook_points(model, [site])  # unknown site: InterventionError before any hook
    cache: dict[tuple, torch.Tensor] = {}

    def add(x, hook):
        if x.shape[-1] != len(v):
            raise SteeringError(f"direction has width {len(v)} but {site} has width {x.shape[-1]}")
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (alpha * v).to(device=x.device, dtype=x.dtype)
        return x + cache[key]

    with hooked(model, fwd=[(site, add)], points=points):
        yield


@dataclass
class Batch:
    """Prompts tokenised once (BOS prepended), right-padded: causal attention means padding never
    changes the real positions' logits; `mask` marks the real ones."""

    tokens: torch.Tensor  # [batch, pos]
    mask: torch.Tensor  # [batch, pos] bool
    last: torch.Tensor  # [batch] index of each prompt's last real token


def tokenize(model, prompts: Sequence[str]) -> Batch:
    if not prompts:
        raise SteeringError("no prompts given")
    rows = [model.to_tokens(p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    device = next(model.parameters()).device
    return Batch(tokens.to(device), mask.to(device), torch.tensor([len(r) - 1 for r in rows], device=device))


@torch.no_grad()
def log_probs(model, batch: Batch) -> Float[torch.Tensor, "batch pos vocab"]:
    return model(batch.tokens).float().log_softmax(-1)


def mean_kl(plain: torch.Tensor, steered_lp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real positions of KL(plain ‖ steered) = Σ p (log p − log q) of next-token distributions."""
    kl = (plain.exp() * (plain - steered_lp)).sum(-1)  # [batch, pos]
    return float(kl[mask].mean())


@dataclass
class Calibration:
    """α found for one target: the KL it gives, how many KL evaluations it took, and whether it is
    within tolerance (False when MAX_EVALS ran out or the target is out of reach)."""

    alpha: float
    kl: float
    target: float
    evals: int
    ok: bool
    log_probs: torch.Tensor | None = None  # [batch, pos, vocab] steered, at the returned α


class KLCurve:
    """KL(α) for one direction, site and prompt set; remembers every evaluated point."""

    def __init__(self, model, batch: Batch, direction: torch.Tensor, site: str):
        self.model, self.batch, self.v, self.site = model, batch, unit(direction), site
        self.plain = log_probs(model, batch)
        self.points: dict[float, tuple[float, torch.Tensor]] = {}

    def __call__(self, alpha: float) -> tuple[float, torch.Tensor]:
        if alpha not in self.points:
            with steered(self.model, self.site, self.v, alpha):
                lp = log_probs(self.model, self.batch)
            self.points[alpha] = (mean_kl(self.plain, lp, self.batch.mask), lp)
        return self.points[alpha]


def calibrate_on(curve: KLCurve, target_kl: float, sign: int, rel_tol: float = REL_TOL) -> Calibration:
    """α = sign·|α| with KL within rel_tol of target_kl (bracket by doubling, bisect in log α)."""
    if target_kl <= 0:
        raise SteeringError(f"target KL must be > 0, got {target_kl}")
    if sign not in (1, -1):
        raise SteeringError(f"sign must be +1 or -1, got {sign}")
    evals0 = len(curve.points)
    lo, hi = 0.0, None  # |α| bounds: KL(lo) < target ≤ KL(hi)
    # start from the closest already-evaluated points of this sign (shared across targets)
    for a, (kl, _) in curve.points.items():
        if a * sign > 0:
            if kl < target_kl and abs(a) > lo:
                lo = abs(a)
            if kl >= target_kl and (hi is None or abs(a) < hi):
                hi = abs(a)
    a = hi if hi is not None else max(lo * 2, 1.0)  # |α| = 1 first, then doubling
    while len(curve.points) - evals0 < MAX_EVALS:
        kl, lp = curve(sign * a)
        if abs(kl - target_kl) <= rel_tol * target_kl:
            return Calibration(sign * a, kl, target_kl, len(curve.points) - evals0, True, lp)
        if kl < target_kl:
            lo = a
        else:
            hi = a
        if hi is None:
            if a > 1e6:
                break  # KL saturates below the target: out of reach
            a *= 2
        else:
            a = math.sqrt(lo * hi) if lo > 0 else hi / 2
    kl, lp = curve(sign * a)
    return Calibration(sign * a, kl, target_kl, len(curve.points) - evals0, False, lp)


def calibrate_alpha(
    model,
    prompts: Sequence[str],
    direction: torch.Tensor,
    site: str,
    target_kl: float,
    sign: int = 1,
    rel_tol: float = REL_TOL,
) -> Calibration:
    """α (signed) whose steering gives mean KL(plain ‖ steered) = target_kl ± rel_tol, over every
    position of `prompts` (BOS prepended)."""
    return calibrate_on(KLCurve(model, tokenize(model, prompts), direction, site), target_kl, sign, rel_tol)


@torch.no_grad()
def generate(
    model,
    prompt: str,
    n_new: int = 20,
    site: str = "",
    direction: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` (n_new tokens), steered when `direction` is given.

    temperature 0 = greedy (argmax); > 0 = sampling from softmax(logits / temperature) with a
    torch.Generator seeded by `seed` (the same seed gives the same text). Recomputes the whole
    prefix each step (no KV cache): short continuations only."""
    tokens = model.to_tokens(prompt)
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    n_prompt = tokens.shape[1]
    ctx = steered(model, site, direction, alpha) if direction is not None else _nothing()
    with ctx:
        for _ in range(n_new):
            logits = model(tokens)[0, -1].float()
            if temperature > 0:
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt[None].to(tokens.device)], 1)
    return model.tokenizer.decode(tokens[0, n_prompt:].tolist())


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def open_prompts() -> list[str]:
    """The project's 10 open steering prompts (workbench/resources/concepts/prompts.json)."""
    import json
    from importlib import resources

    text = resources.files("workbench.resources").joinpath("concepts").joinpath("prompts.json").read_text()
    return list(json.loads(text)["prompts"])


def steer_text(
    model,
    direction: torch.Tensor,
    site: str,
    target_kl: float,
    prompt: str,
    sign: int = 1,
    n_new: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Plain and steered continuations of `prompt`, side by side, with α calibrated to `target_kl`
    on the prompt plus the open prompts (KL over every position). For the app's steering playground."""
    if not prompt.strip():
        raise SteeringError("type a prompt first")
    cal = calibrate_alpha(model, [prompt, *open_prompts()], direction, site, target_kl, sign)
    return {
        "alpha": cal.alpha,
        "kl": cal.kl,
        "reached": cal.ok,
        "plain": generate(model, prompt, n_new, temperature=temperature, seed=seed),
        "steered": generate(model, prompt, n_new, site, direction, cal.alpha, temperature, seed),
    }
