"""Factual-recall tracing: ROME causal tracing plus the mechanisms of Lv et al. 2024.

* Causal tracing (Meng et al. 2022): per fact, P(attribute) with the subject embeddings noised and
  one hidden / MLP / attention state restored, at every token x layer; the severed variant; AIE
  curves by token type with 95 % CIs (`tracing`, `aggregate`).
* Lv et al. 2024 (arXiv 2403.19521): direct logit attribution of every head and MLP, mover heads
  by path patching, the MLP "function application" regression, and the final-layer
  anti-overconfidence measure with the confidence gained when it is removed (`mechanisms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workbench import facts as fact_sets
from workbench.analyses.factual import aggregate, mechanisms, tracing
from workbench.analyses.factual.result import FactualResult
from workbench.analysis import register
from workbench.context import Context
from workbench.inputs import input_field, register_kind
from workbench.models import DEFAULT_MODEL, PROCESSING_MODES

__all__ = ["FactualConfig", "FactualResult", "run"]
POSITIONS = ("all", "types")
CHECK_CHUNK = 64  # facts checked for "known" per step: known_1000 is 1209 rows, most runs need 16

register_kind("facts", fact_sets.fingerprint, fact_sets.canonical)


@dataclass(frozen=True)
class FactualConfig:
    facts: str = input_field("facts", "known")
    """Facts: known (ROME known_1000), relations, relations-cf (counterfactual demos), or a .json/.jsonl/.csv file with subject, prompt, attribute."""
    model: str = input_field("model", DEFAULT_MODEL)
    """Model key, local folder or Hub id."""
    processing: str = "raw"
    """Weight processing: raw (HF numerics) or compat (folded norms, as TransformerLens)."""
    n_facts: int = 16
    """Facts traced: the first n (known) facts of the set (0 = all)."""
    known_only: bool = True
    """Trace only facts whose greedy next token is the attribute's first token (the others are counted and listed)."""
    noise: float = 3.0
    """Noise scale nu: the subject embeddings get nu * sigma * N(0, I), sigma = std of the facts' subject-token embeddings."""
    samples: int = 10
    """Noise draws per fact (P is averaged over them)."""
    seed: int = 1
    """Seed of the noise draws."""
    window: int = 0
    """Layers restored together for MLP / attention states (0 = ROME's 10 of 48, scaled to the model's depth)."""
    positions: Literal["all", "types"] = "all"
    """Positions traced: all (every token from the subject on), or types (first and last subject token,
    first subsequent token, last token: about 3x fewer forward passes on a CPU)."""
    tracing: bool = True
    """Causal tracing (off: only the mechanisms)."""
    severed: bool = True
    """Also the severed variant: hidden states restored with MLP (or attention) outputs at the subject frozen corrupted."""
    mechanisms: bool = True
    """Also DLA, mover heads (path patching), the MLP regression and final-layer suppression."""
    max_batch_tokens: int = 4096
    """Most tokens per forward pass (restored states x noise draws x positions)."""

    def __post_init__(self):
        checks = [
            (
                self.noise > 0,
                f"noise must be > 0 (a multiple of the subject embeddings' std), got {self.noise}",
            ),
            (self.samples >= 1, f"samples must be >= 1, got {self.samples}"),
            (self.n_facts >= 0, f"n_facts must be >= 0, got {self.n_facts}"),
            (self.window >= 0, f"window must be >= 0 (0 = scaled to the model's depth), got {self.window}"),
            (
                self.positions in POSITIONS,
                f"positions must be one of {', '.join(POSITIONS)}, got '{self.positions}'",
            ),
            (self.tracing or self.mechanisms, "nothing to do: tracing and mechanisms are both off"),
            (self.max_batch_tokens >= 1, f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}"),
            (
                self.processing in PROCESSING_MODES,
                f"processing must be one of {', '.join(PROCESSING_MODES)}, got '{self.processing}'",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise fact_sets.FactError(message)
        if not self.facts.strip():
            raise fact_sets.FactError(
                f"facts is empty: give {', '.join(fact_sets.BUILTIN)} or a .json/.jsonl/.csv file"
            )
        fact_sets.fingerprint(self.facts)  # a missing fact file fails here, before any model loads


def select(model, fs: fact_sets.FactSet, n: int, known_only: bool, progress=None):
    """The first n facts to trace (known ones if `known_only`) and the unknown facts met on the way,
    checking CHECK_CHUNK facts at a time; returns (chosen, unknown, n_checked)."""
    chosen: list[fact_sets.Prepared] = []
    unknown: list[fact_sets.Prepared] = []
    checked = 0
    chunk = min(CHECK_CHUNK, 2 * n) if n else CHECK_CHUNK
    starts = range(0, len(fs.facts), chunk)
    for i in progress(starts, desc="checking facts") if progress else starts:
        prepared = [fact_sets.prepare(f, model) for f in fs.facts[i : i + chunk]]
        known, missed = fact_sets.split_known(model, prepared) if known_only else (prepared, [])
        chosen += known
        unknown += missed
        checked += len(prepared)
        if n and len(chosen) >= n:
            break
    return (chosen[:n] if n else chosen), unknown, checked


@register("factual", version=1)
def run(cfg: FactualConfig, ctx: Context) -> FactualResult:
    """Causal tracing of facts (ROME) and the Lv et al. mechanisms, averaged by token type."""
    fs = fact_sets.load_facts(cfg.facts)  # file errors before the model loads
    model = ctx.model(cfg.model, cfg.processing)
    chosen, unknown, checked = select(model, fs, cfg.n_facts, cfg.known_only, ctx.progress)
    if not chosen:
        raise fact_sets.FactError(
            f"facts {cfg.facts}: the model knows none of the {len(unknown)} facts checked "
            "(known_only=False traces them anyway)"
        )
    window = cfg.window or tracing.default_window(model.cfg.n_layers)
    sigma = tracing.subject_std(model, chosen)
    maps, p_clean, p_corr = [], [], []
    for p in ctx.progress(chosen if cfg.tracing else [], desc="causal tracing"):
        tracer = tracing.Tracer(
            model, p.tokens, p.start, p.end, p.target, cfg.noise * sigma, cfg.samples, cfg.seed, window
        )
        where = (
            tracing.type_representatives(p.start, p.end, len(p.tokens)) if cfg.positions == "types" else None
        )
        states = tracing.all_states(model.cfg.n_layers, len(p.tokens), p.start, cfg.severed, where)
        per_pass = max(1, cfg.max_batch_tokens // (cfg.samples * len(p.tokens)))
        maps.append(tracing.to_maps(tracer, states, tracing.trace(tracer, states, per_pass), cfg.severed))
        p_clean.append(tracer.p_clean)
        p_corr.append(tracer.p_corrupted)
    mech = mechanisms.run_all(model, chosen, cfg.max_batch_tokens, ctx.progress) if cfg.mechanisms else {}
    return FactualResult.build(
        cfg=cfg,
        model=model,
        chosen=chosen,
        unknown=unknown,
        checked=checked,
        fingerprint=fs.fingerprint,
        window=window,
        sigma=sigma,
        maps=maps,
        p_clean=p_clean,
        p_corrupted=p_corr,
        mech=mech,
        aggregate=aggregate,
    )
