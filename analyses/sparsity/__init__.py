"""Activation sparsity of MLP neurons: Lazy Neuron ratios, Sparsing Law PPL-p%, top-k intervention.

* Lazy Neuron (Li et al. 2023, arXiv 2210.06313): fraction of nonzero MLP activations per layer and
  per neuron; for smooth activations also |a| > eps and the fraction of positive pre-activations.
* Sparsing Law (Luo, Song et al. 2024, arXiv 2411.02335): PPL-p% activation ratio, with per-layer
  CETT thresholds on |a_i| * ||W_out[i]|| and a bisection on CETT to a p% perplexity increase.
* Top-k (Li et al. 2023, "Top-k Transformer"): keep the k largest activations per token and measure
  loss and top-1 agreement vs k.

The neuron activation a_i is `blocks.{l}.mlp.hook_post`, the input of the down projection
(act(gate) * up for gated MLPs such as SmolLM2/Llama; act(pre) otherwise); `mlp.hook_pre` is the
gate projection's output before the activation (checked on a tiny Llama through the Bridge).
Firing rates come from an activation store; the interventions run the model on held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workbench.analyses.sparsity.cett import TailCurves, pplp_search
from workbench.analyses.sparsity.held import HeldEval, held_tokens
from workbench.analyses.sparsity.measure import (
    DEFINITIONS,
    POST,
    calibration_rows,
    firing_rates,
    mlp_layers,
    read_rows,
)
from workbench.analyses.sparsity.result import SparsityResult
from workbench.analyses.sparsity.topk import SCORES, topk_sweep
from workbench.analysis import register
from workbench.capture import CaptureConfig
from workbench.context import Context
from workbench.data import default_source
from workbench.inputs import captured, input_field
from workbench.models import DEFAULT_MODEL

__all__ = ["SparsityConfig", "SparsityResult", "run"]


@dataclass(frozen=True)
class SparsityConfig:
    store: str = input_field("store")
    """Activation store holding blocks.*.mlp.hook_post (and hook_pre); empty = capture from the fields below."""
    model: str = captured(DEFAULT_MODEL, kind="model")
    """Model to capture from and intervene on when no store is given."""
    data: str = captured(default_factory=default_source, kind="data")
    """Text source: the first n_tokens are measured, the next held_tokens are the held-out text."""
    n_tokens: int = captured(1024)
    """Tokens captured for the firing-rate measurement (and CETT calibration) when no store is given."""
    ctx_len: int = captured(128)
    """Context length (BOS included) of the capture and of the held text."""
    batch_size: int = 8
    """Sequences per forward pass."""
    skip_bos: bool = True
    """Leave position 0 out of every ratio and never sparsify it (BOS / attention-sink activations)."""
    eps: float = 0.01
    """Magnitude threshold of the |a| > eps definition (for GELU/SiLU, where exact zeros are rare)."""
    fire_def: Literal["nonzero", "eps", "pre_pos"] = "eps"
    """Firing definition for dead/always-on neurons: nonzero (a != 0), eps (|a| > eps) or pre_pos (pre > 0)."""
    ppl_p: float = 1.0
    """PPL-p%: the allowed perplexity increase in percent (Sparsing Law uses 1); 0 skips the search."""
    held_tokens: int = 512
    """Tokens of held-out text (after the measured ones) for the PPL-p% search and the top-k sweep."""
    cett_tokens: int = 128
    """Measured tokens (evenly strided sample) used to fit the per-layer CETT thresholds."""
    search_tol: float = 0.001
    """Stop the CETT bisection when the perplexity ratio is within this of 1 + p/100."""
    search_iters: int = 16
    """Most CETT bisection steps (one held-text forward pass each)."""
    topk_ks: str = "0.01,0.03,0.1,0.2,0.35,0.5,1"
    """Top-k sweep, comma-separated: values <= 1 are fractions of d_mlp, larger ones neuron counts; empty skips."""
    topk_layers: str = "all"
    """Layers the top-k intervention applies to: 'all' or comma-separated indices."""
    topk_score: Literal["abs", "weighted"] = "abs"
    """Top-k ranking score per token: abs (|a_i|, Lazy Neuron) or weighted (|a_i| * ||W_out[i]||, WINA/CETT)."""

    def __post_init__(self):
        checks = [
            (self.fire_def in DEFINITIONS, f"fire_def must be one of {DEFINITIONS}, got '{self.fire_def}'"),
            (self.topk_score in SCORES, f"topk_score must be one of {SCORES}, got '{self.topk_score}'"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (0 <= self.ppl_p < 100, f"ppl_p is a percentage in [0, 100), got {self.ppl_p}"),
            (self.cett_tokens > 0 and self.held_tokens > 0, "cett_tokens and held_tokens must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.k_values(1)  # parse errors surface at config time

    def capture_config(self) -> CaptureConfig:
        return CaptureConfig(
            model=self.model,
            sites=("blocks.*.mlp.hook_pre", "blocks.*.mlp.hook_post"),
            data=self.data,
            n_tokens=self.n_tokens,
            ctx_len=self.ctx_len,
            batch_size=self.batch_size,
        )

    def k_values(self, d_mlp: int) -> list[int]:
        """Sorted distinct k of the sweep for a layer width d_mlp."""
        try:
            values = [float(v) for v in str(self.topk_ks).split(",") if v.strip()]
        except ValueError as err:
            raise ValueError(f"topk_ks must be comma-separated numbers, got '{self.topk_ks}'") from err
        if any(v <= 0 for v in values):
            raise ValueError(f"topk_ks values must be positive, got '{self.topk_ks}'")
        return sorted({min(d_mlp, max(1, round(v * d_mlp)) if v <= 1 else int(v)) for v in values})

    def layer_list(self, layers: list[int]) -> list[int]:
        if self.topk_layers.strip() == "all":
            return list(layers)
        try:
            chosen = sorted({int(v) for v in self.topk_layers.split(",") if v.strip()})
        except ValueError as err:
            raise ValueError(
                f"topk_layers must be 'all' or comma-separated ints, got '{self.topk_layers}'"
            ) from err
        missing = [layer for layer in chosen if layer not in layers]
        if missing:
            raise ValueError(f"topk_layers {missing} not among the measured layers {layers[0]}..{layers[-1]}")
        return chosen


def definitions(cfg: SparsityConfig) -> dict[str, str]:
    """The measures in words, stored with the result."""
    a = "a = blocks.{l}.mlp.hook_post, the down-projection input (act(gate)*up for gated MLPs, act(pre) otherwise)"
    bos = "; position 0 excluded" if cfg.skip_bos else ""
    return {
        "nonzero": f"fraction of entries with a != 0 (Lazy Neuron %nonzero; exact only for ReLU); {a}{bos}",
        "eps": f"fraction of entries with |a| > {cfg.eps:g}{bos}",
        "pre_pos": "fraction of blocks.{l}.mlp.hook_pre > 0 (the gate projection output for gated MLPs, the "
        f"pre-activation otherwise){bos}",
        "pplp": f"PPL-{cfg.ppl_p:g}% (Sparsing Law): zero a_i where |a_i|*||W_out[l][i]|| <= t_l, t_l fitted on "
        f"{cfg.cett_tokens} measured tokens so CETT_l(t_l) = c, c bisected until held-text PPL ratio = "
        f"{1 + cfg.ppl_p / 100:g}; ratio = fraction of entries kept and nonzero on the held text{bos}",
        "topk": f"keep the k largest {'|a_i|*||W_out[i]||' if cfg.topk_score == 'weighted' else '|a_i|'} per "
        f"token at the chosen layers, zero the rest; loss and top-1 agreement on held text{bos}",
        "dead/always_on": f"neurons firing on 0% / 100% of measured tokens under '{cfg.fire_def}'",
    }


@register("sparsity", version=1)
def run(cfg: SparsityConfig, ctx: Context) -> SparsityResult:
    """Activation sparsity: Lazy Neuron ratios, Sparsing Law PPL-p% ratio and top-k loss curve per layer."""
    store = ctx.store_or_capture(cfg.store, cfg.capture_config())
    layers = mlp_layers(store)
    rates, n_tokens = firing_rates(store, layers, cfg.eps, cfg.skip_bos, ctx.progress)
    model = ctx.model(store.config["model"], store.config.get("processing", "raw"))
    d_mlp = rates["nonzero"].shape[-1]
    pplp, topk, n_held = interventions(cfg, ctx, store, model, layers, d_mlp)
    return SparsityResult(
        model=store.config["model"],
        store=str(store.root),
        layers=layers,
        d_mlp=d_mlp,
        n_tokens=n_tokens,
        eps=cfg.eps,
        fire_def=cfg.fire_def,
        definitions=definitions(cfg),
        rates=rates,
        pplp=pplp,
        topk=topk,
        held_tokens=n_held,
    )


def interventions(cfg: SparsityConfig, ctx: Context, store, model, layers: list[int], d_mlp: int):
    """The PPL-p% search and the top-k sweep on the held text -> (pplp, topk, held token count)."""
    ks, topk_layers = cfg.k_values(d_mlp), cfg.layer_list(layers)
    if cfg.ppl_p <= 0 and not ks:
        return {}, {}, 0
    W_out = model.W_out.detach().float().cpu()  # [n_layers, d_mlp, d_model]
    w_norms = {layer: W_out[layer].norm(dim=-1) for layer in layers}  # [d_mlp] each
    ctx_len = store.config["ctx_len"]
    tokens = held_tokens(
        store.config["data"],
        model.tokenizer,
        ctx_len,
        store.config["bos"],
        store.n_rows // ctx_len,
        cfg.held_tokens,
    )
    held = HeldEval(model, tokens, cfg.batch_size)
    first_pos = 1 if cfg.skip_bos else 0
    pplp, topk = {}, {}
    if cfg.ppl_p > 0:
        curves = TailCurves()
        rows = calibration_rows(store, cfg.skip_bos, cfg.cett_tokens)
        for layer in ctx.progress(layers, desc="sparsity: CETT curves"):
            curves.add_layer(layer, read_rows(store, POST.format(layer), rows), W_out[layer])
        pplp = pplp_search(
            curves, held, w_norms, cfg.ppl_p, cfg.search_tol, cfg.search_iters, first_pos, ctx.progress
        )
    if ks:
        rows_k = topk_sweep(held, topk_layers, ks, w_norms, first_pos, cfg.topk_score, ctx.progress)
        topk = {"layers": topk_layers, "score": cfg.topk_score, "dense_loss": held.dense.loss, "rows": rows_k}
    return pplp, topk, tokens.numel()
