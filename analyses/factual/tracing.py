"""Causal tracing (ROME; Meng, Bau, Andonian, Belinkov 2022, `experiments/causal_trace.py`).

Corrupt: add ν·σ·N(0, I) to the token embeddings of the subject span (`samples` seeded draws).
Restore: copy the clean value of one state into every corrupted draw and read P(target) at the
last position, averaged over the draws. States: the residual stream after block l at position t
("hidden"), or the MLP / attention outputs at t of a window of layers around l ("mlp", "attn";
ROME uses 10 of 48 layers). Indirect effect IE = P_restored - P_corrupted; total effect
TE = P_clean - P_corrupted. The severed variant restores a hidden state while the MLP (or
attention) outputs at the subject tokens stay at their corrupted values in every layer.

Many states go through one forward pass: row block i of a batch restores state i (one row per
noise draw). `reference_probs` is the one-state-per-forward loop of the paper's code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from workbench.interventions import hook_points, hooked

KINDS = ("hidden", "mlp", "attn")
HOOKS = {
    "hidden": "blocks.{}.hook_resid_post",
    "mlp": "blocks.{}.hook_mlp_out",
    "attn": "blocks.{}.hook_attn_out",
}
SEVER = ("mlp", "attn")
EMBED = "hook_embed"
FINAL = "ln_final.hook_out"


class _Stop(Exception):
    """Raised by the hook at the final norm: the unembedding is applied to the last position only."""


def default_window(n_layers: int) -> int:
    """ROME's window of 10 layers out of 48, scaled to the model's depth (at least 1)."""
    return max(1, round(10 * n_layers / 48))


def layers_of(kind: str, layer: int, window: int, n_layers: int) -> range:
    """The layers a restoration at `layer` covers: one for hidden states, a window centred on it otherwise."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True)
class State:
    kind: str  # hidden | mlp | attn
    layer: int
    pos: int
    sever: str = ""  # "" | mlp | attn: freeze those outputs at the subject tokens (hidden only)


class Tracer:
    """Clean and corrupted runs of one fact, then P(target) with any states restored.

    tokens [pos]; subject span [start, end); `noise` = ν·σ, the absolute noise scale."""

    def __init__(self, model, tokens, start, end, target, noise: float, samples: int, seed: int, window: int):
        self.model, self.tokens, self.start, self.end, self.target = model, tokens, start, end, target
        self.samples, self.window = samples, window
        n_layers = model.cfg.n_layers
        names = [HOOKS[k].format(layer) for k in KINDS for layer in range(n_layers)]
        self.points = hook_points(model, names + [EMBED, FINAL])
        gen = torch.Generator().manual_seed(seed)
        d_model = model.cfg.d_model
        self.noise = (noise * torch.randn(samples, end - start, d_model, generator=gen)).to(tokens.device)
        self.clean, p_clean = self._cache(tokens[None], corrupt=False)
        self.corrupted, p_corr = self._cache(tokens[None].expand(samples, -1), corrupt=True)
        self.p_clean, self.p_corrupted = float(p_clean[0]), float(p_corr.mean())

    @torch.no_grad()
    def _cache(self, batch, corrupt: bool):
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable:
            def hook(x, hook):
                acts[name] = x.detach().clone()

            return hook

        fwd = [(n, keep(n)) for n in self.points if n not in (EMBED, FINAL)]
        if corrupt:
            fwd.append((EMBED, self._corrupt_embed(batch.shape[0])))
        probs = self._forward(batch, fwd)
        return {n: a[0] if not corrupt else a for n, a in acts.items()}, probs

    def _corrupt_embed(self, rows: int) -> Callable:
        noise = self.noise.repeat(rows // self.samples, 1, 1)

        def hook(x, hook):
            x = x.clone()
            x[:, self.start : self.end] += noise.to(x.dtype)
            return x

        return hook

    def _forward(self, batch, fwd) -> torch.Tensor:
        """P(target) at the last position per row."""
        logits = last_logits(self.model, batch, fwd, self.points)
        return logits.float().softmax(-1)[:, self.target]

    @torch.no_grad()
    def probs(self, states: list[State]) -> torch.Tensor:
        """P(target) averaged over the noise draws, for each state, all in one forward pass."""
        rows = len(states) * self.samples
        edits: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        subject = torch.arange(self.start, self.end)
        draws = torch.arange(self.samples)
        n_layers = self.model.cfg.n_layers
        for i, s in enumerate(states):
            block = torch.arange(i * self.samples, (i + 1) * self.samples)
            for layer in layers_of(s.kind, s.layer, self.window, n_layers):
                name = HOOKS[s.kind].format(layer)
                value = self.clean[name][s.pos].expand(self.samples, -1)
                edits.setdefault(name, []).append((block, torch.full_like(block, s.pos), value))
            if s.sever:
                for layer in range(n_layers):
                    name = HOOKS[s.sever].format(layer)
                    r, p = block[:, None].expand(-1, len(subject)), subject.expand(self.samples, -1)
                    value = self.corrupted[name][draws[:, None], subject[None]]
                    edits.setdefault(name, []).append((r.flatten(), p.flatten(), value.flatten(0, 1)))
        fwd = [(EMBED, self._corrupt_embed(rows))] + [(n, _setter(e)) for n, e in edits.items()]
        batch = self.tokens[None].expand(rows, -1)
        return self._forward(batch, fwd).view(len(states), self.samples).mean(1)


def last_logits(model, batch, fwd, points: dict | None = None) -> torch.Tensor:
    """Logits [batch, vocab] at the last position under hooks `fwd`; the unembedding runs on that
    position only (a hook at the final norm stops the forward pass there)."""
    final: list[torch.Tensor] = []

    def stop(x, hook):
        final.append(x[:, -1])
        raise _Stop

    try:
        with hooked(model, fwd=[*fwd, (FINAL, stop)], points=points):
            model(batch, return_type="logits")
    except _Stop:
        pass
    return final[0] @ model.W_U + model.b_U


def _setter(edits: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Callable:
    """A hook writing value rows into x[row, pos] (the freezes come after the restores of a hook)."""
    rows = torch.cat([e[0] for e in edits])
    pos = torch.cat([e[1] for e in edits])
    values = torch.cat([e[2] for e in edits])

    def hook(x, hook):
        x = x.clone()
        x[rows.to(x.device), pos.to(x.device)] = values.to(x.dtype)
        return x

    return hook


@torch.no_grad()
def subject_std(model, prepared) -> float:
    """sigma: std of the token embeddings (hook_embed, as the model scales them) of every subject
    token of the facts, as ROME's `collect_embedding_std`."""
    rows = []

    def keep(x, hook):
        rows.append(x[0])
        raise _Stop

    for p in prepared:
        try:
            with hooked(model, fwd=[(EMBED, keep)]):
                model(p.tokens[None], return_type="logits")
        except _Stop:
            pass
        rows[-1] = rows[-1][p.start : p.end]
    return float(torch.cat(rows).float().std())


def all_states(
    n_layers: int, n_pos: int, start: int, severed: bool, positions: list[int] | None = None
) -> list[State]:
    """Every (kind, layer, pos) state at or after the subject's first token (earlier positions are
    identical in the clean and corrupted runs: restoring them is a no-op), then the severed ones.
    `positions` limits the positions traced (None: all)."""
    where = [t for t in range(start, n_pos) if positions is None or t in positions]
    out = [State(k, layer, t) for k in KINDS for layer in range(n_layers) for t in where]
    if severed:
        out += [State("hidden", layer, t, s) for s in SEVER for layer in range(n_layers) for t in where]
    return out


def type_representatives(start: int, end: int, n_pos: int) -> list[int]:
    """First and last subject token, first subsequent token and last token (positions="types")."""
    return sorted({start, end - 1, min(end, n_pos - 1), n_pos - 1})


def trace(tracer: Tracer, states: list[State], max_states: int, step: Callable | None = None) -> torch.Tensor:
    """P(target) for each state, `max_states` states per forward pass."""
    out = []
    for i in range(0, len(states), max_states):
        out.append(tracer.probs(states[i : i + max_states]))
        if step:
            step()
    return torch.cat(out) if out else torch.zeros(0)


def reference_probs(tracer: Tracer, states: Iterable[State]) -> torch.Tensor:
    """The paper's loop: one forward pass (of `samples` corrupted rows) per restored state."""
    return torch.stack([tracer.probs([s])[0] for s in states])


def to_maps(tracer: Tracer, states: list[State], probs: torch.Tensor, severed: bool) -> torch.Tensor:
    """[kind (hidden, mlp, attn[, hidden|mlp severed, hidden|attn severed]), layer, pos] of P(target);
    positions before the subject hold P_corrupted (restoring them changes nothing), untraced ones NaN."""
    n_kinds = len(KINDS) + (len(SEVER) if severed else 0)
    maps = torch.full((n_kinds, tracer.model.cfg.n_layers, len(tracer.tokens)), float("nan"))
    maps[:, :, : tracer.start] = tracer.p_corrupted
    for s, p in zip(states, probs.tolist()):
        k = KINDS.index(s.kind) if not s.sever else len(KINDS) + SEVER.index(s.sever)
        maps[k, s.layer, s.pos] = p
    return maps
