"""Evaluation of a bigram subnetwork on held-out text (Chang & Bergen 2025, arXiv 2504.15471).

Given the pooled model, a hard mask (`workbench.masks.MaskSet`) and the corpus bigram model
(`workbench.bigram`), on held-out token sequences (`held_out_tokens`: the packed sequences after the
ones used for training, never the training batches):

- kept entries per matrix (layer, kind), overall kept fraction of the maskable matrices;
- per-token surprisal −ln q(x_{t+1} | x_≤t) (nats) of each variant at every position t < pos−1;
- Pearson r between the subnetwork's and the bigram model's surprisals, dropping positions whose
  bigram surprisal is infinite and setting infinite model surprisals to the largest finite one
  (the reference's `ngram_corr_dropinf`, `train_circuits.py`);
- CE(P_bigram(·|x_t) ‖ q(·|x_≤t)) averaged over every position (the training loss without λ);
- ablation (`ablation_perplexities.py`): mean and std of surprisal (inf → largest finite) for the
  full model, the subnetwork, its complement, and `n_random` seeded random masks with the same
  per-matrix kept counts and their complements (the random rows average over seeds);
- covariance similarity between layers (the reference README's `layer_covariance.png`): for each
  residual-stream site i (index 0 = `blocks.0.hook_resid_pre`, the embeddings, i.e. the current-
  token space; index l ≥ 1 = `blocks.{l-1}.hook_resid_post`, the last one, before the final norm,
  being the next-token-prediction space) the covariance C_i of the activations over held-out
  tokens (BOS positions excluded: their massive activations would dominate C), and
  sim(i, j) = ⟨C_i, C_j⟩_F / (‖C_i‖_F ‖C_j‖_F). `current` = sim(l, 0), `next` = sim(l, L).
  The reference releases the per-layer SVDs it computes this from, not the formula: this cosine
  of covariance matrices is our reading of "covariance similarity".
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from workbench import data
from workbench.bigram import BigramModel
from workbench.masks import MaskSet, apply_mask

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.(.+)\.weight$")
Progress = Callable[[Iterable, int, str], Iterable]


def _no_progress(items: Iterable, total: int, desc: str) -> Iterable:
    return items


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 8
    n_random: int = 1  # random masks (and their complements) with the subnetwork's per-matrix counts
    seed: int = 0
    max_scatter: int = 4000  # surprisal pairs kept for the scatter plot (seeded subsample)
    similarity: bool = True  # residual-stream covariance similarity (one d×d covariance per layer)


@dataclass
class BigramEval:
    """Everything the evaluation measures; see the module docstring for what each counts."""

    matrix_names: list[str]
    matrix_kept: list[int]
    matrix_total: list[int]
    ablation: list[dict]
    r_bigram: float
    n_r: int
    n_inf_dropped: int
    ce_bigram: float
    ce_bigram_full: float
    n_positions: int
    scatter_bigram: Tensor
    scatter_masked: Tensor
    covsim_full: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    covsim_sub: Tensor = field(default_factory=lambda: torch.zeros(0, 0))


def held_out_tokens(source: str, tokenizer, ctx_len: int, bos: str, skip_seqs: int, n_seqs: int) -> Tensor:
    """[n_seqs, ctx_len] ids: the packed sequences `skip_seqs … skip_seqs + n_seqs − 1` of `source`.

    With the training source, `skip_seqs` = the number of training sequences, so no held-out token
    was in a training batch."""
    seqs = list(itertools.islice(data.pack(source, tokenizer, ctx_len, bos), skip_seqs, skip_seqs + n_seqs))
    if len(seqs) < n_seqs:
        raise ValueError(
            f"text source {source} has {skip_seqs + len(seqs)} sequences of {ctx_len} tokens; the held-out "
            f"text needs {n_seqs} after the {skip_seqs} training ones: pass fewer eval tokens or more text"
        )
    return torch.tensor([s.tokens for s in seqs])


def kept_by_matrix(mask: MaskSet) -> tuple[list[str], list[int], list[int]]:
    """Names, kept entries and sizes of every masked matrix, in the mask's order."""
    names = list(mask.masks)
    return names, [int(mask.masks[n].sum()) for n in names], [mask.masks[n].numel() for n in names]


def layer_and_kind(name: str) -> tuple[int, str]:
    """`model.layers.3.mlp.up_proj.weight` -> (3, "mlp.up_proj")."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"not a block weight: {name}")
    return int(m.group(1)), m.group(2)


def evaluate(
    model,
    mask: MaskSet,
    target: BigramModel,
    tokens: Tensor,
    specials: list[int | None],
    settings: EvalSettings = EvalSettings(),
    progress: Progress = _no_progress,
) -> BigramEval:
    """Measure the subnetwork `mask` against the full model and the bigram `target` on `tokens`."""
    names, kept, total = kept_by_matrix(mask)
    bigram_s = _bigram_surprisals(target, tokens, specials)
    full = _run(model, None, tokens, target, specials, settings, progress, "full model")
    sub = _run(model, mask, tokens, target, specials, settings, progress, "subnetwork")
    rows = [_row("full model", 1.0, full["surprisal"]), _row("subnetwork", _frac(mask), sub["surprisal"])]
    comp = _masked_s(model, mask.complement(), tokens, target.vocab_size, settings)
    rows.append(_row("complement", _frac(mask.complement()), comp))
    rows += _random_rows(model, mask, tokens, target.vocab_size, settings, progress)
    r, n_r, n_drop = dropinf_r(sub["surprisal"].flatten(), bigram_s.flatten())
    scatter_b, scatter_m = _scatter(bigram_s.flatten(), sub["surprisal"].flatten(), settings)
    return BigramEval(
        matrix_names=names,
        matrix_kept=kept,
        matrix_total=total,
        ablation=rows,
        r_bigram=r,
        n_r=n_r,
        n_inf_dropped=n_drop,
        ce_bigram=sub["ce"],
        ce_bigram_full=full["ce"],
        n_positions=bigram_s.numel(),
        scatter_bigram=scatter_b,
        scatter_masked=scatter_m,
        covsim_full=full["covsim"],
        covsim_sub=sub["covsim"],
    )


def _frac(mask: MaskSet) -> float:
    return mask.kept_fraction()


def _bigram_surprisals(target: BigramModel, tokens: Tensor, specials) -> Tensor:
    """[n_seq, pos−1]: −ln P_bigram(x_{t+1} | x_t), BOS/EOS contexts read as the document start."""
    prev = target.contexts(tokens[:, :-1].flatten(), specials)
    return target.surprisal(prev, tokens[:, 1:].flatten()).view(len(tokens), -1)


def _run(model, mask, tokens, target, specials, settings, progress, desc) -> dict:
    """Surprisals [n_seq, pos−1], mean CE to the bigram target, and the layer covariance similarity."""
    cov = _Covariance(model) if settings.similarity else None
    surprisal, ce_sum = [], 0.0
    batches = tokens.split(settings.batch_size)
    with torch.no_grad(), _maybe_masked(model, mask):
        for batch in progress(batches, len(batches), desc):
            log_q = _log_q(model, batch, target.vocab_size, cov)
            surprisal.append(-log_q[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1))
            prev = target.contexts(batch.flatten(), specials)
            ce_sum += float(target.cross_entropy(prev, log_q.flatten(0, 1)).double().sum())
    return {
        "surprisal": torch.cat(surprisal),
        "ce": ce_sum / tokens.numel(),
        "covsim": cov.similarity() if cov else torch.zeros(0, 0),
    }


def _masked_s(model, mask: MaskSet, tokens: Tensor, vocab: int, settings: EvalSettings) -> Tensor:
    """Surprisals [n_seq, pos−1] of the model under `mask`."""
    out = []
    with torch.no_grad(), apply_mask(model, mask):
        for batch in tokens.split(settings.batch_size):
            log_q = _log_q(model, batch, vocab, None)
            out.append(-log_q[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


def _random_rows(
    model, mask: MaskSet, tokens: Tensor, vocab: int, settings: EvalSettings, progress
) -> list[dict]:
    rand, comp = [], []
    for i in progress(range(settings.n_random), settings.n_random, "random masks"):
        random_mask = mask.random_like(seed=settings.seed + i)
        rand.append(_masked_s(model, random_mask, tokens, vocab, settings))
        comp.append(_masked_s(model, random_mask.complement(), tokens, vocab, settings))
    if not rand:
        return []
    n = settings.n_random
    return [
        _row(f"random, same per-matrix counts (mean of {n})", _frac(mask), *rand),
        _row(f"random complement (mean of {n})", _frac(mask.complement()), *comp),
    ]


def _row(variant: str, kept_fraction: float, *surprisals: Tensor) -> dict:
    """Mean and std of surprisal (nats), inf -> largest finite value as the reference; several
    tensors (random seeds) are averaged seed by seed."""
    stats = [_finite(s.flatten()) for s in surprisals]
    means = [float(s.mean()) for s in stats]
    stds = [float(s.std(correction=0)) for s in stats]
    return {
        "variant": variant,
        "kept_fraction": kept_fraction,
        "mean_surprisal": sum(means) / len(means),
        "std_surprisal": sum(stds) / len(stds),
    }


def _finite(s: Tensor) -> Tensor:
    s = s.double().clone()
    inf = torch.isinf(s)
    if inf.any() and (~inf).any():
        s[inf] = s[~inf].max()
    return s


def dropinf_r(model_s: Tensor, bigram_s: Tensor) -> tuple[float, int, int]:
    """Pearson r over positions with finite bigram surprisal (model infs -> largest finite value).
    Returns (r, positions used, positions dropped)."""
    keep = torch.isfinite(bigram_s)
    x, y = _finite(model_s)[keep], bigram_s.double()[keep]
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan"), int(keep.sum()), int((~keep).sum())
    r = torch.corrcoef(torch.stack([x, y]))[0, 1]
    return float(r), int(keep.sum()), int((~keep).sum())


def _scatter(bigram_s: Tensor, masked_s: Tensor, settings: EvalSettings) -> tuple[Tensor, Tensor]:
    keep = torch.isfinite(bigram_s).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(settings.seed)
    pick = keep[torch.randperm(len(keep), generator=gen)[: settings.max_scatter]].sort().values
    return bigram_s[pick].float(), masked_s[pick].float()


class _maybe_masked:
    """`apply_mask(model, mask)`, or nothing for the full model."""

    def __init__(self, model, mask: MaskSet | None):
        self.cm = apply_mask(model, mask) if mask is not None else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm else None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm else False


def _log_q(model, batch: Tensor, vocab: int, cov: _Covariance | None) -> Tensor:
    """log-softmax over the first `vocab` logits (the target's vocabulary), [batch, pos, vocab]."""
    hooks = cov.hooks(batch) if cov else []
    logits = model.run_with_hooks(batch, fwd_hooks=hooks, return_type="logits")
    return logits[..., :vocab].float().log_softmax(-1)


class _Covariance:
    """Running Σx and Σxxᵀ (float64) of each residual site over non-BOS positions."""

    def __init__(self, model):
        n_layers = model.cfg.n_layers
        self.sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
        d = model.cfg.d_model
        self.sum = torch.zeros(len(self.sites), d, dtype=torch.float64)
        self.outer = torch.zeros(len(self.sites), d, d, dtype=torch.float64)
        self.n = 0

    def hooks(self, batch: Tensor) -> list:
        self.n += batch[:, 1:].numel()
        return [(site, self._hook(i)) for i, site in enumerate(self.sites)]

    def _hook(self, i: int):
        def hook(act, hook):  # act [batch, pos, d_model]; position 0 is BOS
            x = act[:, 1:].detach().reshape(-1, act.shape[-1]).double().cpu()
            self.sum[i] += x.sum(0)
            self.outer[i] += x.T @ x
            return act

        return hook

    def similarity(self) -> Tensor:
        """[sites, sites] cosine similarity of the covariance matrices."""
        mean = self.sum / max(self.n, 1)
        cov = self.outer / max(self.n, 1) - mean[:, :, None] * mean[:, None, :]
        flat = cov.flatten(1)
        flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return (flat @ flat.T).float()
