"""Causal tracing (ROME; Meng, Bau, Andonian, Belinkov 2022, `experiments/causal_trace.py`).

Corrupt: add ν·σ·N(0, I) to the token embeddings of the subject span (`samples` seeded draws).
Restore: copy the clean value of one state into every corrupted draw and read P(target) at the
last position, averaged over the draws. States: the residual stream after block l at position t
("hidden"), or the MLP / attention outputs at t of a window of layers around l ("mlp", "attn";
ROME uses 10 of 48 layers). Indirect effect IE = P_restored - P_corrupted; total effect
TE = P_clean - P_corrupted. The severed variant restores a hidden state while the MLP (or
attention) outputs at the subject tokens stay at their corrupted values in every layer.

Many states go through one forward pass: row block i of a batch restores state i (one row per
noise draw). Below the earliest layer a batch edits, every row is the corrupted run, so the pass
carries only the `samples` corrupted rows up to that block's input and widens to every state's rows
there (`trace` orders states by that layer so a pass starts as late as it can).
`reference_probs` is the one-state-per-forward loop of the paper's code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
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
BLOCK_IN = "blocks.{}.hook_resid_pre"
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
        names += [BLOCK_IN.format(layer) for layer in range(n_layers)]
        self.points = hook_points(model, names + [EMBED, FINAL])
        self._state_hooks = {HOOKS[k].format(layer) for k in KINDS for layer in range(n_layers)}
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

        fwd = [(n, keep(n)) for n in self.points if n in self._state_hooks]
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
        """P(target) averaged over the noise draws, for each state, all in one forward pass.

        The pass runs `samples` corrupted rows up to block `first_edit(states)` and widens there
        to one row block per state; edits below a state's own layers are no-ops (its rows are the
        corrupted run), so severing starts at the restored layer."""
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
                for layer in range(s.layer, n_layers):
                    name = HOOKS[s.sever].format(layer)
                    r, p = block[:, None].expand(-1, len(subject)), subject.expand(self.samples, -1)
                    value = self.corrupted[name][draws[:, None], subject[None]]
                    edits.setdefault(name, []).append((r.flatten(), p.flatten(), value.flatten(0, 1)))
        widen = (BLOCK_IN.format(first_edit(states, self.window, n_layers)), _widen(len(states)))
        fwd = [(EMBED, self._corrupt_embed(self.samples)), widen] + [
            (n, _setter(e)) for n, e in edits.items()
        ]
        batch = self.tokens[None].expand(self.samples, -1)
        with self._mlps_where_changed(states):
            return self._forward(batch, fwd).view(len(states), self.samples).mean(1)

    @contextmanager
    def _mlps_where_changed(self, states: list[State]):
        """Run each MLP only on the (row, position) pairs its state can change: positions from the
        state's own on (attention is causal; the edits sit at that position, and a severed state's
        freezes at earlier subject positions write the corrupted values they already hold), in
        blocks from the first one it edits. Every other pair is the corrupted run, whose MLP
        outputs are cached. The MLP is ~3/4 of a block's multiply-adds, and a state's prefix
        averages about half the prompt."""
        n_layers, n_pos = self.model.cfg.n_layers, len(self.tokens)
        first = torch.tensor([first_edit([s], self.window, n_layers) for s in states])
        pos = torch.tensor([s.pos for s in states])
        first, pos = first.repeat_interleave(self.samples), pos.repeat_interleave(self.samples)
        later = torch.arange(n_pos)[None] >= pos[:, None]  # [rows, pos]
        patched = []
        for layer, block in enumerate(self.model.blocks):
            inner = getattr(block.mlp, "original_component", None)
            if inner is None or getattr(block.mlp, "_use_processed_weights", False):
                continue  # compat mode computes the MLP from folded weights: left whole
            need = later & (layer >= first)[:, None]
            cached = self.corrupted[HOOKS["mlp"].format(layer)]
            inner.forward = _partial_mlp(inner.forward, need, cached, self.samples)
            patched.append(inner)
        try:
            yield
        finally:
            for inner in patched:
                del inner.forward  # the class's forward again


def first_edit(states: Iterable[State], window: int, n_layers: int) -> int:
    """The lowest block whose output any of `states` edits (severing starts at the restored layer)."""
    return min(layers_of(s.kind, s.layer, window, n_layers)[0] for s in states)


def _partial_mlp(forward: Callable, need: torch.Tensor, cached: torch.Tensor, samples: int) -> Callable:
    """An MLP forward computing only the `need`ed [row, pos] entries of a widened batch; the rest
    are the cached corrupted outputs of the row's noise draw (row = state block × samples + draw).
    Before the widening (`samples` rows) it runs whole."""

    def run(x, *args, **kwargs):
        if x.shape[0] == samples or x.shape[0] != need.shape[0]:
            return forward(x, *args, **kwargs)
        out = cached.to(x.dtype).repeat(x.shape[0] // samples, 1, 1)
        where = need.to(x.device)
        if where.any():
            out[where] = forward(x[where], *args, **kwargs)
        return out

    return run


def _widen(copies: int) -> Callable:
    """A hook repeating the `samples` corrupted rows into one row block per state."""

    def hook(x, hook):
        return x.repeat(copies, *([1] * (x.dim() - 1)))

    return hook


def last_logits(model, batch, fwd, points: dict | None = None) -> torch.Tensor:
    """Logits [batch, vocab] at the last position under hooks `fwd`; the unembedding runs on that
    position only (a hook at the final norm stops the forward pass there)."""
    final: list[torch.Tensor] = []

    def stop(x, hook):
        final.append(x[:, -1])
        raise _Stop

    try:
        with hooked(model, fwd=[*fwd, (FINAL, stop)], points=points), _masks_follow_rows(model):
            model(batch, return_type="logits")
    except _Stop:
        pass
    return final[0] @ model.W_U + model.b_U


@contextmanager
def _masks_follow_rows(model):
    """Let a hook widen the batch mid-forward: the attention mask the model built for the input's
    rows (identical rows: the prompts are unpadded) is repeated to the rows each attention sees."""

    def widen(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and torch.is_tensor(x) and 1 < mask.shape[0] < x.shape[0]:
            kwargs["attention_mask"] = mask.repeat(x.shape[0] // mask.shape[0], *([1] * (mask.dim() - 1)))
        return args, kwargs

    handles = [b.attn.register_forward_pre_hook(widen, with_kwargs=True) for b in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    """P(target) for each state, `max_states` states per forward pass; states go in order of the
    first block they edit, so each pass widens as late as it can (returned in the input order).
    A state before the subject's first token is answered with P_corrupted and no forward pass: its
    clean and corrupted values are the same numbers (the noise is on the subject, attention is causal)."""
    n_layers, window = tracer.model.cfg.n_layers, tracer.window
    out = torch.full((len(states),), tracer.p_corrupted)
    live = [i for i, s in enumerate(states) if s.pos >= tracer.start]
    order = sorted(live, key=lambda i: first_edit([states[i]], window, n_layers))
    for i in range(0, len(order), max_states):
        chunk = order[i : i + max_states]
        out[chunk] = tracer.probs([states[j] for j in chunk])
        if step:
            step()
    return out


@torch.no_grad()
def reference_probs(tracer: Tracer, states: Iterable[State]) -> torch.Tensor:
    """The paper's loop, written independently of `Tracer.probs`: per restored state, one full
    forward pass of the `samples` corrupted rows from the embeddings, the clean value written at
    the state's layers and, when severed, the corrupted outputs frozen at every layer."""
    out = []
    n_layers, subject = tracer.model.cfg.n_layers, slice(tracer.start, tracer.end)
    for s in states:
        fwd = [(EMBED, tracer._corrupt_embed(tracer.samples))]
        for layer in layers_of(s.kind, s.layer, tracer.window, n_layers):
            fwd.append(
                (HOOKS[s.kind].format(layer), _restore(tracer.clean[HOOKS[s.kind].format(layer)], s.pos))
            )
        for layer in range(n_layers) if s.sever else ():
            name = HOOKS[s.sever].format(layer)
            fwd.append((name, _freeze(tracer.corrupted[name], subject)))
        batch = tracer.tokens[None].expand(tracer.samples, -1)
        out.append(tracer._forward(batch, fwd).mean())
    return torch.stack(out)


def _restore(clean: torch.Tensor, pos: int) -> Callable:
    def hook(x, hook):
        x = x.clone()
        x[:, pos] = clean[pos].to(x.dtype)
        return x

    return hook


def _freeze(corrupted: torch.Tensor, subject: slice) -> Callable:
    def hook(x, hook):
        x = x.clone()
        x[:, subject] = corrupted[:, subject].to(x.dtype)
        return x

    return hook


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
