"""Train a sparse dictionary (SAE, transcoder, MP-SAE, top-AFA) from an activation store.

    workbench run train-sae --store ~/.cache/workbench/stores/<run> --site blocks.15.hook_resid_post \
        --arch topk --d-sae 4608 --k 32

Batches come from the store (seeded shuffle, never a model forward per step); SAELens' trainer does
the optimisation (see `sae/train.py`). The dictionary is saved in SAELens' format under
`$WORKBENCH_HOME/dictionaries/<key>` (load it with `sae.io.load_dictionary`) with the store's
model, hook names, processing mode and BOS policy in its `cfg.json` metadata. Checkpoints live in
the run's work folder, so re-running a killed command resumes it. Architectures and equations:
methods.md §2 (Gao et al. 2024; Bussmann et al. 2024; Rajamanoharan et al. 2024; Dunefsky et al.
2024; Costa et al. 2025; Lee et al. 2025).

The default recipe (beats SAELens' defaults on the 1M-token smollm2 store, data/sae_notes.md):
  * rows: the training split's ordinary tokens (`sae.rows`: BOS/special tokens and rows above
    `outlier_factor` × the median norm left out; every `held_out_every`-th sequence held out);
  * b_dec initialised at the geometric median (or mean) of the training rows in training units —
    at zero, most TopK latents never fire (61 % dead on smollm2 L15);
  * the dead-latent window (AuxK's target set) is min(dead_window_tokens, dead_window_frac × the
    run's tokens), so short runs get a window AuxK can act on;
  * TopK/BatchTopK latents silent for min(resample_window_tokens, that window) are resampled
    towards high-error rows every 1/16 of the run until 3/4 of it (`sae.resample`);
  * a one-line warning when a run makes < 1 pass or > MANY_PASSES passes over its training rows;
  * the saved dictionary is scored on held-out rows (`final`, split "held_out") and on training
    rows (`final_train`, split "train").
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from typing import Literal

import torch

from workbench.analysis import Result, register
from workbench.capture import CaptureConfig
from workbench.context import Context
from workbench.data import default_source
from workbench.inputs import captured, input_field
from workbench.models import DEFAULT_MODEL
from workbench.sae.archs import ARCHS, ArchSpec, build
from workbench.sae.data import StoreStream
from workbench.sae.io import dictionaries_dir, save_dictionary
from workbench.sae.recipe import dead_window_tokens, init_b_dec, input_scaling, passes_warning, score
from workbench.sae.resample import ARCHS as RESAMPLE_ARCHS
from workbench.sae.rows import RowRule, Rows, select_rows, special_token_ids
from workbench.sae.train import LoopConfig, train
from workbench.sae.transcoder import check_input_site, is_mlp_input, mlp_input_site, mlp_output_site
from workbench.store import ActivationStore

log = logging.getLogger(__name__)
MANY_PASSES = 20  # beyond this a small store is memorised rather than summarised: warn


@dataclass(frozen=True)
class TrainSAEConfig:
    store: str = input_field("store")
    """Activation store to train from; empty = capture one (model, data, capture_tokens below)."""
    site: str = ""
    """Input hook name; empty = the store's only site (transcoder: its mlp.hook_in site), or the middle layer when capturing."""
    target_site: str = ""
    """Transcoder target hook; empty = hook_mlp_out of the input site's layer."""
    arch: Literal["standard", "topk", "batchtopk", "jumprelu", "mp", "transcoder", "top_afa"] = "topk"
    """One of standard, topk, batchtopk, jumprelu, mp, transcoder, top_afa."""
    d_sae: int = 0
    """Dictionary size; 0 = expansion × d_in."""
    expansion: int = 8
    """Dictionary size as a multiple of d_in when d_sae is 0."""
    k: int = 32
    """Active latents per token (topk), mean per token (batchtopk), greedy steps (mp)."""
    l1_coefficient: float = 5.0
    """L1 weight (standard, transcoder); inputs are scaled to E‖x‖ = √d_in when normalize is on."""
    l0_coefficient: float = 1.0
    """L0 weight (jumprelu, the paper's λ·L0 with a rectangle-kernel STE)."""
    jumprelu_sparsity: Literal["step", "tanh", "quadratic"] = "step"
    """JumpReLU sparsity loss: step (paper λ·L0), tanh (Anthropic) or quadratic (λ·(L0 − target_l0)², needs target_l0)."""
    target_l0: float = 0.0
    """Target L0 of the quadratic JumpReLU sparsity loss."""
    aux_coefficient: float = 1 / 32
    """AuxK dead-latent loss weight (topk, batchtopk, top_afa)."""
    afa_coefficient: float = 1 / 32
    """Norm-matching loss weight (top_afa)."""
    lr: float = 3e-4
    """Adam learning rate."""
    n_tokens: int = 0
    """Training tokens; 0 = one pass over the training rows (warned about when < 1 or > 20 passes)."""
    steps: int = 0
    """Training steps; overrides n_tokens when > 0."""
    batch_size: int = 1024
    """Tokens per step."""
    seed: int = 0
    """Seed of the initialisation and of the shuffle."""
    skip_special: bool = True
    """Leave out BOS (position 0) and special-token rows (the tokenizer's BOS/EOS/PAD ids), as SAELens does."""
    outlier_factor: float = 5.0
    """Leave out rows whose norm exceeds this × the site's median row norm (massive activations); 0 = off."""
    held_out_every: int = 20
    """Hold out every N-th whole sequence (counting back from the last) for evaluation; 0 = train on all."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial b_dec (the target site's centre for transcoders), measured on the training rows."""
    normalize: bool = True
    """Scale inputs by √d_in / E‖x‖ during training (SAELens expected_average_only_in), folded in at the end."""
    lr_warm_up_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_decay_steps: int = 0
    """Linear learning-rate decay steps at the end."""
    sparsity_warm_up_steps: int = 0
    """Linear warm-up of the L1/L0 coefficient."""
    dead_window_tokens: int = 500_000
    """Cap on the dead-latent window: a latent is dead (AuxK's target) after this many tokens without firing."""
    dead_window_frac: float = 0.1
    """The window is min(dead_window_tokens, this × the run's tokens), at least one step."""
    resample_dead: bool = True
    """Re-initialise silent latents towards high-error rows every 1/16 of the run until 3/4 of it
    (Bricken et al. 2023, adapted to TopK; topk and batchtopk: other architectures ignore it).
    data/sae_notes.md has the measurements on 1M smollm2 tokens."""
    resample_window_tokens: int = 16_384
    """A latent silent for min(this, the dead window) tokens is resampled: shorter than AuxK's window,
    so latents too rare to fire on an evaluation's tokens are re-used too."""
    checkpoint_every: int = 200
    """Steps between checkpoints (resume after a kill)."""
    eval_tokens: int = 8192
    """Ordinary rows of each split used for the final L0/FVU of the saved dictionary."""
    model: str = captured(DEFAULT_MODEL, kind="model")
    """Model to capture from when no store is given."""
    data: str = captured(default_factory=default_source, kind="data")
    """Text to capture from when no store is given."""
    capture_tokens: int = captured(16384, key="n_tokens")
    """Tokens to capture when no store is given."""
    ctx_len: int = captured(128)
    """Context length of the capture when no store is given."""
    capture_dtype: Literal["float32", "float16", "bfloat16"] = captured("float32", key="dtype")
    """Storage dtype of the capture when no store is given (float16 halves disk and reads)."""


@dataclass
class TrainSAEResult(Result):
    dictionary: str
    """Folder of the saved dictionary (SAELens cfg.json + sae_weights.safetensors)."""
    arch: str
    site: str
    target_site: str
    store: str
    d_in: int
    d_sae: int
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    scaling: list
    """Input (and target) scaling factors used in training, already folded into the weights."""
    final: dict
    """On held-out rows (split 'held_out'): l0, fvu (ordinary tokens), fvu_all_but_bos, explained_variance,
    mse, frac_never_fired (no firing on these rows), n_tokens; plus frac_dead_window (dead by the
    training window at the end), ever_dead_window, revived (latents AuxK brought back) and resampled
    (latents `resample_dead` re-initialised at least once)."""
    final_train: dict
    """The same measures on training rows (split 'train')."""
    rows: dict
    """The row rule (stated), per-site median norms and the rows excluded from training."""
    dead_window_tokens: int
    """The dead-latent window this run used (min(cap, frac × run tokens))."""
    warning: str
    """The passes warning, if the run made < 1 or > MANY_PASSES passes over its training rows."""
    curves: dict[str, torch.Tensor]
    """step, tokens, loss, mse, aux_loss, l0, fvu, frac_dead_window, revived, lr, every 10 steps."""

    def summary(self) -> list[dict]:
        base = {"arch": self.arch, "site": self.site, "d_sae": self.d_sae, "tokens": self.tokens}
        return [{**base, **self.final}, {**base, **self.final_train}]

    def figures(self) -> dict:
        import plotly.express as px

        x = self.curves["tokens"].tolist()
        figs = {}
        for name, title, log in (
            ("loss", "training loss", True),
            ("l0", "L0 (active latents per token)", False),
            ("fvu", "fraction of variance unexplained", True),
            ("frac_dead_window", "dead-latent fraction (training window)", False),
        ):
            fig = px.line(x=x, y=self.curves[name].tolist(), log_y=log, title=f"{self.arch} {title}")
            fig.update_layout(xaxis_title="training tokens", yaxis_title=name)
            figs[title] = fig
        return figs


def resolve_sites(cfg: TrainSAEConfig, sites: list[str]) -> tuple[str, str]:
    """(input site, target site or '') from the config and the store's sites."""
    site = cfg.site
    if not site:
        pick = [s for s in sites if is_mlp_input(s)] if cfg.arch == "transcoder" else sites
        if len(pick) != 1:
            raise ValueError(f"choose --site: the store holds {', '.join(sites)}")
        site = pick[0]
    target = cfg.target_site
    if cfg.arch == "transcoder" and not target:
        target = mlp_output_site(site)
    for s in (site, target):
        if s and s not in sites:
            raise ValueError(f"site '{s}' is not in the store; it holds: {', '.join(sites)}")
    if target and cfg.arch != "transcoder":
        raise ValueError(f"target_site is for transcoders; arch '{cfg.arch}' reconstructs its input")
    return site, target


def open_store(cfg: TrainSAEConfig, ctx: Context) -> ActivationStore:
    if cfg.store:
        return ctx.store(cfg.store)
    site, target = cfg.site, cfg.target_site
    if not site:
        mid = ctx.model(cfg.model).cfg.n_layers // 2
        site = (
            mlp_input_site(mid)  # the MLP's true input (after the norm's weight)
            if cfg.arch == "transcoder"
            else f"blocks.{mid}.hook_resid_post"
        )
    if cfg.arch == "transcoder" and not target:
        target = mlp_output_site(site)
    sites = (site, target) if target else (site,)
    return ctx.capture(
        CaptureConfig(
            model=cfg.model,
            sites=sites,
            data=cfg.data,
            n_tokens=cfg.capture_tokens,
            ctx_len=cfg.ctx_len,
            dtype=cfg.capture_dtype,
        )
    )


def dictionary_metadata(
    store: ActivationStore, cfg: TrainSAEConfig, site: str, target: str, scaling: list
) -> dict:
    from workbench.sae.compat import identity_metadata  # model id, processing, store: one place

    meta = identity_metadata(store.config, store.root) | {"hook_name": site}
    meta["workbench"] |= {
        "skip_special_in_training": cfg.skip_special,
        "store_fingerprint": store.fingerprint,
        "activation_scaling": scaling,
        "seed": cfg.seed,
    }
    if target:
        meta["hook_name_out"] = target
    return meta


def arch_spec(cfg: TrainSAEConfig, d_in: int, d_out: int) -> ArchSpec:
    return ArchSpec(
        arch=cfg.arch,
        d_in=d_in,
        d_sae=cfg.d_sae or cfg.expansion * d_in,
        d_out=d_out,
        k=cfg.k,
        l1_coefficient=cfg.l1_coefficient,
        l0_coefficient=cfg.l0_coefficient,
        aux_coefficient=cfg.aux_coefficient,
        jumprelu_sparsity=cfg.jumprelu_sparsity,
        target_l0=cfg.target_l0,
        afa_coefficient=cfg.afa_coefficient,
        sparsity_warm_up_steps=cfg.sparsity_warm_up_steps,
    )


def loop_config(cfg: TrainSAEConfig, steps: int, window_tokens: int) -> LoopConfig:
    return LoopConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        dead_window_steps=max(1, window_tokens // cfg.batch_size),
        checkpoint_every=cfg.checkpoint_every,
        resample_dead=cfg.resample_dead and cfg.arch in RESAMPLE_ARCHS,
        resample_window_steps=max(1, min(cfg.resample_window_tokens, window_tokens) // cfg.batch_size),
    )


def select_splits(cfg: TrainSAEConfig, store: ActivationStore, sites: list[str]) -> tuple[Rows, Rows, dict]:
    """Training and held-out rows under the config's row rule, and the rule as recorded."""
    rule = RowRule(cfg.skip_special, cfg.outlier_factor, cfg.held_out_every)
    special = special_token_ids(store) if cfg.skip_special else []
    train_rows = select_rows(store, sites, rule, "train", special)
    held = select_rows(store, sites, rule, "held_out", special, norms=train_rows.norms)
    record = {
        "rule": rule.describe(),
        "skip_special": cfg.skip_special,
        "outlier_factor": cfg.outlier_factor,
        "held_out_every": cfg.held_out_every,
        "special_ids": special,
        "median_norms": train_rows.medians,
    }
    return train_rows, held, record


@register("train-sae", version=2)
def run(cfg: TrainSAEConfig, ctx: Context) -> TrainSAEResult:
    """Train a sparse dictionary (SAE / transcoder / MP-SAE / top-AFA) from an activation store."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown arch '{cfg.arch}'; choose one of {', '.join(ARCHS)}")
    store = open_store(cfg, ctx)
    site, target = resolve_sites(cfg, store.sites)
    if target:  # before any pass over the store: the pre-γ site is refused on raw stores
        check_input_site(site, store.config.get("processing", "raw"))
    sites = [site, target] if target else [site]
    d_in = math.prod(store.shape(site))
    d_out = math.prod(store.shape(target)) if target else 0
    train_rows, held, rule = select_splits(cfg, store, sites)
    scaling = input_scaling(store, sites, train_rows) if cfg.normalize else [1.0] * len(sites)
    spec = arch_spec(cfg, d_in, d_out)
    meta = dictionary_metadata(store, cfg, site, target, scaling)
    row_rule = {k: v for k, v in rule.items() if k != "special_ids"} | {
        "store_fingerprint": store.fingerprint
    }
    meta.setdefault("workbench", {})["row_rule"] = row_rule  # sae-eval finds the held-out split by it
    sae = build(spec, meta, seed=cfg.seed)
    init_b_dec(sae, store, sites[-1], train_rows.keep, scaling[-1], cfg.b_dec_init)

    def make_stream(start: int) -> StoreStream:
        return StoreStream(
            store, sites, cfg.batch_size, seed=cfg.seed, keep=train_rows.keep, scales=scaling, start=start
        )

    epoch_steps = make_stream(0).batches_per_epoch()
    steps = cfg.steps or (math.ceil(cfg.n_tokens / cfg.batch_size) if cfg.n_tokens else epoch_steps)
    window = dead_window_tokens(
        cfg.dead_window_tokens, cfg.dead_window_frac, steps * cfg.batch_size, cfg.batch_size
    )
    run_tokens, ordinary = steps * cfg.batch_size, train_rows.counts["ordinary_rows"]
    warning = passes_warning(run_tokens, ordinary, MANY_PASSES, epoch_steps * cfg.batch_size)
    if warning:
        log.warning(warning)
    loop = loop_config(cfg, steps, window)
    identity = {
        "spec": vars(spec),
        "store": store.fingerprint,
        "sites": sites,
        "scaling": scaling,
        "seed": cfg.seed,
        "rows": rule,
        "b_dec_init": cfg.b_dec_init,
    }
    outcome = train(
        sae, make_stream, loop, ctx.work_dir, identity, show_bar=ctx.show_bars, callback=ctx.on_progress
    )
    dead = outcome.curves["frac_dead_window"]
    fold_scaling(sae, scaling)
    folder = str(save_dictionary(sae, dictionaries_dir() / ctx.work_dir.name))
    final = score(folder, store, sites, held, cfg.eval_tokens) | {
        "frac_dead_window": dead[-1].item() if len(dead) else 0.0,
        "ever_dead_window": int(outcome.ever_dead.sum()),
        "revived": int(outcome.revived.sum()),
        "resampled": int(outcome.resampled.sum()),
    }
    final_train = score(folder, store, sites, train_rows, cfg.eval_tokens)
    shutil.rmtree(ctx.work_dir / "checkpoint", ignore_errors=True)
    return TrainSAEResult(
        dictionary=folder,
        arch=cfg.arch,
        site=site,
        target_site=target,
        store=str(store.root),
        d_in=d_in,
        d_sae=spec.d_sae,
        steps=outcome.steps_done,
        tokens=outcome.steps_done * cfg.batch_size,
        seconds=outcome.seconds,
        tokens_per_s=outcome.steps_done * cfg.batch_size / max(outcome.seconds, 1e-9),
        scaling=scaling,
        final=final,
        final_train=final_train,
        rows=rule | {"train": train_rows.counts, "held_out": held.counts},
        dead_window_tokens=window,
        warning=warning or "",
        curves=outcome.curves,
    )


def fold_scaling(sae, scaling: list[float]) -> None:
    """Fold the training-time input scaling into the weights so the dictionary reads raw activations."""
    if len(scaling) == 2:
        sae.fold_scaling(*scaling)
    elif scaling[0] != 1.0:
        sae.fold_activation_norm_scaling_factor(scaling[0])
