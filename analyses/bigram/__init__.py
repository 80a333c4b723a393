"""Bigram subnetworks: the minimal weight mask that turns the model into a bigram predictor.

Chang & Bergen 2025, "Bigram subnetworks: mapping to next tokens in Transformer language models"
(arXiv 2504.15471). `run` trains a continuous-sparsification mask over every attention and MLP
matrix towards the corpus bigram distribution (`train.py`), or loads one (`mask=`), saves it as
safetensors under `$WORKBENCH_HOME/masks/`, then evaluates it on held-out text (`evaluate.py`).

Split: the text source is packed into `ctx_len`-token sequences; the first `train_seqs` train the
mask (all but the last `eval_seqs` when 0) and the next `eval_seqs` are the held-out evaluation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench import data, masks, paths
from workbench.analyses.bigram import train
from workbench.analyses.bigram.evaluate import EvalSettings, evaluate, held_out_tokens
from workbench.analyses.bigram.result import BigramResult
from workbench.analysis import config_to_dict, register
from workbench.bigram import bigram_model
from workbench.context import Context
from workbench.data import default_source
from workbench.inputs import canonical_path, input_field, register_kind
from workbench.models import DEFAULT_MODEL

__all__ = ["BigramConfig", "BigramResult", "run"]


def _mask_fingerprint(path: str) -> str | None:
    return paths.sha256_file(Path(path)) if path else None


register_kind("mask", _mask_fingerprint, lambda v: canonical_path(v) if v else v)


@dataclass(frozen=True)
class BigramConfig:
    model: str = input_field("model", DEFAULT_MODEL)
    """Model key, local folder or Hub id (loaded in raw processing mode: masks act on raw weights)."""
    data: str = input_field("data", default_factory=default_source)
    """Text for the mask-training batches and the held-out evaluation (comma-separate several sources)."""
    corpus: str = input_field("data", "")
    """Text whose bigram counts are the target (empty = the same as data)."""
    mask: str = input_field("mask", "")
    """A saved mask (.safetensors) to evaluate instead of training one."""
    lam: float = 10.0
    """λ: weight of the mask-size penalty (λ/N)·Σσ(T·s); 10 is the paper's released default."""
    steps: int = 200
    """Most optimiser steps (the paper: 15000 on a GPU); training stops early once < 1 % undecided."""
    batch_size: int = 8
    """Sequences per step (the paper: 32)."""
    ctx_len: int = 64
    """Tokens per sequence (BOS first)."""
    lr: float = 5e-5
    """AdamW learning rate (the paper's)."""
    temp_growth: float = 1.001
    """The mask temperature T is multiplied by this after every step (the paper: 1.001)."""
    train_seqs: int = 0
    """Sequences used for training (0 = every sequence but the held-out ones)."""
    eval_seqs: int = 16
    """Held-out sequences evaluated (after the training ones)."""
    n_random: int = 1
    """Random masks with the same per-matrix counts (and their complements) in the ablation."""
    similarity: bool = True
    """Also the residual-stream covariance similarity to the current/next-token spaces by layer."""
    seed: int = 0
    """Seed of the batch order and the random masks."""
    checkpoint_every: int = 50
    """Steps between checkpoints (a killed run resumes from the last one)."""

    def __post_init__(self):
        if self.lam < 0:
            raise masks.MaskError(
                f"lam must be >= 0 (the size penalty's weight; the paper's default is 10), got {self.lam}"
            )
        if self.temp_growth < 1:
            raise masks.MaskError(f"temp_growth must be >= 1 (T only grows), got {self.temp_growth}")
        for name in ("steps", "batch_size", "eval_seqs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise masks.MaskError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ctx_len < 2:
            raise masks.MaskError(f"ctx_len must be >= 2, got {self.ctx_len}")
        if not self.train_seqs and any(p.startswith("hf:") for p in data.split_sources(self.data)):
            raise masks.MaskError(
                "a Hub text source has no known end: pass train_seqs (the held-out sequences follow them)"
            )
        for source in filter(None, (self.data, self.corpus)):
            data.check_source(source)  # a missing file fails here, before the model loads
        if self.mask:
            masks.read_mask(self.mask)  # unreadable or foreign files fail before the model loads


def training_tokens(cfg: BigramConfig, tokenizer) -> tuple[torch.Tensor, int]:
    """([train_seqs, ctx_len] ids, n_train): the first sequences of the packed text; the held-out
    `eval_seqs` follow them."""
    want = cfg.train_seqs + cfg.eval_seqs if cfg.train_seqs else None
    seqs = [s.tokens for s in itertools.islice(data.pack(cfg.data, tokenizer, cfg.ctx_len), want)]
    n_train = cfg.train_seqs or len(seqs) - cfg.eval_seqs
    if n_train < 1 or len(seqs) < n_train + cfg.eval_seqs:
        raise masks.MaskError(
            f"text source {cfg.data} gives {len(seqs)} sequences of {cfg.ctx_len} tokens; training needs "
            f"{max(cfg.train_seqs, 1)} plus {cfg.eval_seqs} held out: pass more text or fewer eval_seqs"
        )
    return torch.tensor(seqs[:n_train]), n_train


def mask_file(work_dir: Path) -> Path:
    """Where a trained mask is saved: $WORKBENCH_HOME/masks/<run key prefix>.safetensors."""
    return paths.home() / "masks" / f"{work_dir.name}.safetensors"


@register("bigram-subnetwork", version=1)
def run(cfg: BigramConfig, ctx: Context) -> BigramResult:
    """Bigram subnetwork (Chang & Bergen 2025): a sparse weight mask trained to predict corpus bigrams."""
    model = ctx.model(cfg.model, "raw")
    tokenizer = model.tokenizer
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    target = bigram_model(cfg.corpus or cfg.data, tokenizer, model.cfg.d_vocab, progress=ctx.show_bars)
    train_tokens, n_train = training_tokens(cfg, tokenizer)
    curves, training = {}, {}
    if cfg.mask:
        mask, path = masks.load_mask(cfg.mask, model), Path(cfg.mask)
    else:
        settings = train.TrainSettings(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            lam=cfg.lam,
            temp_growth=cfg.temp_growth,
            checkpoint_every=cfg.checkpoint_every,
            seed=cfg.seed,
        )
        identity = {"config": config_to_dict(cfg), "weights": model.workbench.weights_hash}
        out = train.train(
            model,
            target,
            train_tokens,
            settings,
            ctx.work_dir,
            identity,
            specials,
            ctx.show_bars,
            ctx.on_progress,
        )
        mask, curves = out.mask, out.curves
        training = {"steps_done": out.steps_done, "stopped_early": out.stopped_early, "seconds": out.seconds}
        path = masks.save_mask(mask_file(ctx.work_dir), mask, model, lam=cfg.lam, **training)
    held = held_out_tokens(cfg.data, tokenizer, cfg.ctx_len, "prepend", n_train, cfg.eval_seqs)
    evaluation = evaluate(
        model,
        mask,
        target,
        held,
        specials,
        EvalSettings(
            batch_size=cfg.batch_size, n_random=cfg.n_random, seed=cfg.seed, similarity=cfg.similarity
        ),
        lambda items, total, desc: ctx.progress(items, total, desc),
    )
    return BigramResult.from_eval(
        evaluation,
        model=cfg.model,
        held_out=f"{cfg.data}: sequences {n_train}..{n_train + cfg.eval_seqs - 1} of {cfg.ctx_len} tokens",
        mask_path=str(path),
        training=training,
        curves=curves,
    )
