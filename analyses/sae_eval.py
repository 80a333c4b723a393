"""Evaluate sparse dictionaries (SAEs and transcoders) on stored activations and spliced into the model.

For each dictionary (a SAELens folder: cfg.json + safetensors) this reports, with SAELens/SAEBench
metric names (ecosystem.md §4.4): L0 and L1; FVU and explained variance with the conventional
definition (methods.md §2.0; SAELens PR #443/#665 fixed two historic bugs in this number); MSE and
cosine of x̂ to x; CE loss recovered and KL when x̂ is spliced into the forward pass
(`run_with_hooks`, zero-ablation as the baseline); dead and dense latents; decoder cosine
similarity; and the AFA evaluation of Lee et al. 2025 (arXiv 2503.24277): ‖f̃‖/‖x‖ per token,
whose theoretical expectation is 1 within the bound |‖x‖² − ‖f̃‖²| ≤ ε(‖f̃‖₁² − ‖f̃‖₂²).
Transcoders (Dunefsky et al. 2024) read their input site and are scored on the output site: the
spliced loss is the replacement loss (MLP output replaced by the transcoder output) and the FVU
is the fidelity of the MLP output. Several dictionaries (e.g. one per layer) give one row each.

Rows (`sae.rows`, the rule training uses): special tokens (BOS and the tokenizer's structural ids,
as SAELens' exclude_special_tokens) are left out of every metric and keep their own activation in
the splice; norm outliers (> outlier_factor × the site's median row norm) are left out of `fvu`
and every stored metric, and also pass through the splice unchanged; `fvu_all_but_bos` scores the
same span of text with them. `split` says which rows: 'held_out' (default) = the sequences the
dictionary's training held out of this store, or the whole store when it was trained elsewhere;
'train' = the rows it trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from workbench.analysis import Result, register
from workbench.context import Context
from workbench.inputs import input_field
from workbench.sae import metrics as M
from workbench.sae.compat import check_store
from workbench.sae.rows import RowRule, Rows, first_span, select_rows, special_token_ids
from workbench.sae.splice import splice_inputs, splice_metrics
from workbench.sites import layer_of


def load_dictionary(spec: str):
    """A SAELens SAE/Transcoder: `sae.io.load_dictionary` (folder, saved name or release/id), else a folder."""
    try:
        from workbench.sae.io import load_dictionary as load
    except ImportError:  # sae.io not installed alongside: plain SAELens folders only
        from sae_lens import SAE

        if not Path(spec).exists():
            raise FileNotFoundError(
                f"no dictionary at '{spec}' (expected a folder with cfg.json + safetensors)"
            ) from None
        load = SAE.load_from_disk
    sae = load(spec).eval()
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        sae.turn_off_forward_pass_hook_z_reshaping()  # we flatten [n_heads, d_head] ourselves
    return sae


def dictionary_sites(sae) -> tuple[str, str]:
    """(input hook, output hook); equal for SAEs, different for transcoders."""
    meta = sae.cfg.metadata
    hook_in = meta.hook_name
    if not hook_in:
        raise ValueError("dictionary config has no metadata.hook_name; cannot tell which site it reads")
    return hook_in, getattr(meta, "hook_name_out", None) or hook_in


@dataclass(frozen=True)
class SaeEvalConfig:
    dictionary: str = input_field("dictionary")
    """Dictionary folder(s) (SAELens cfg.json + safetensors), comma-separated for one row each."""
    store: str = input_field("store")
    """Activation store holding the dictionary's site(s) (a transcoder needs input and output sites)."""
    model: str = input_field("model")
    """Model for the spliced CE/KL; empty = the store's model (and its weight processing)."""
    n_tokens: int = 8192
    """Stored tokens used for L0/FVU/density/AFA."""
    n_seqs: int = 8
    """Store sequences spliced through the model for CE loss recovered and KL (0 = skip)."""
    batch_size: int = 4
    """Sequences per forward pass of the splice."""
    token_batch: int = 1024
    """Rows per encode/decode batch."""
    skip_special: bool = True
    """Leave BOS (position 0) and special tokens out of every metric and keep their original activation
    in the splice (SAELens' exclude_special_tokens); the zero-ablation baseline ablates all positions."""
    outlier_factor: float = 5.0
    """Rows whose norm exceeds this × the site's median row norm are left out of the metrics and pass
    through the splice unchanged (counted in outliers_excluded); 0 = off."""
    split: Literal["held_out", "train"] = "held_out"
    """Rows the dictionary never trained on (its held-out sequences of its training store, or all of
    another store), or its training rows."""


@dataclass
class SaeEvalResult(Result):
    store: str
    model: str
    table: list[dict]
    """One row per dictionary: SAELens/SAEBench metric names plus AFA and transcoder fields."""
    formulas: dict[str, str]
    frequency: dict[str, torch.Tensor]
    """dictionary index -> [d_sae] firing frequency over the evaluated tokens."""
    max_cos: dict[str, torch.Tensor]
    """dictionary index -> [d_sae] max |cos| of each decoder row to another latent's."""
    afa_ratio: dict[str, torch.Tensor]
    """dictionary index -> [tokens] ‖f̃‖/‖x‖ (f̃ scaled by decoder norms, ‖b_dec‖ appended)."""
    afa_ratio_centered: dict[str, torch.Tensor]
    x_norm: dict[str, torch.Tensor]
    """dictionary index -> [tokens] ‖x‖ of the reconstruction target (x axis of the ZF plot)."""
    """dictionary index -> [tokens] ‖f̃‖/‖x − b_dec‖ (what top-AFA's k* selection matches)."""
    l0_per_token: dict[str, torch.Tensor]

    def summary(self) -> list[dict]:
        return self.table

    def figures(self) -> dict:
        import plotly.graph_objects as go

        names = {str(i): f"{r['site_out']} ({r['architecture']})" for i, r in enumerate(self.table)}
        figs = {}
        fig = go.Figure(layout_title_text="latent firing frequency (log10; dead latents counted apart)")
        for i, freq in self.frequency.items():
            counts, edges, dead = M.log_frequency_histogram(freq)
            fig.add_bar(x=edges[:-1], y=counts, name=f"{names[i]}, {dead} dead")
        figs["firing frequency"] = fig.update_layout(xaxis_title="log10 frequency", yaxis_title="latents")
        fig = go.Figure(layout_title_text="max |cos| of each decoder row to another latent")
        for i, cos in self.max_cos.items():
            fig.add_histogram(x=cos.tolist(), name=names[i], nbinsx=50)
        figs["decoder cosine"] = fig.update_layout(xaxis_title="max |cos|", yaxis_title="latents")
        fig = go.Figure(layout_title_text="AFA: ||f~|| / ||x|| per token (theory: 1)")
        for i, ratio in self.afa_ratio.items():
            fig.add_box(y=ratio[:5000].tolist(), name=names[i], boxpoints=False)
        fig.add_hline(y=1.0, line_dash="dash", annotation_text="AFA expectation")
        figs["AFA norm ratio by layer"] = fig.update_layout(yaxis_title="||f~|| / ||x||")
        fig = go.Figure(
            layout_title_text="ZF plot: ||x|| vs ||f~|| per token (Lee et al. 2025; diagonal = AFA)"
        )
        for i, ratio in self.afa_ratio.items():
            x = self.x_norm[i][:3000]
            fig.add_scattergl(
                x=x.tolist(), y=(ratio[:3000] * x).tolist(), mode="markers", name=names[i], marker_size=3
            )
        top = max((float(v[:3000].max()) for v in self.x_norm.values() if len(v)), default=1.0)
        fig.add_scatter(x=[0, top], y=[0, top], mode="lines", line_dash="dash", name="||f~|| = ||x||")
        figs["ZF plot"] = fig.update_layout(xaxis_title="||x||", yaxis_title="||f~||")
        fig = go.Figure(layout_title_text="L0 per token")
        for i, l0 in self.l0_per_token.items():
            fig.add_histogram(x=l0.tolist(), name=names[i], nbinsx=50)
        figs["L0 per token"] = fig.update_layout(xaxis_title="active latents", yaxis_title="tokens")
        return figs


def eval_rows(sae, store, cfg: SaeEvalConfig, path: str, special: list[int]) -> Rows:
    """The rows of `cfg.split` for this dictionary on this store under the row rule (module docstring)."""
    record = sae.cfg.metadata.get("workbench") or {}
    rule_record = record.get("row_rule") or {}
    trained_here = store.fingerprint in (
        rule_record.get("store_fingerprint"),
        record.get("store_fingerprint"),
    )
    every = int(rule_record.get("held_out_every", 0))
    if not trained_here and cfg.split == "train":
        raise ValueError(
            f"dictionary {path} was not trained on store {store.root} (or does not record it), "
            "so it has no training rows there: use --split held_out"
        )
    if trained_here and cfg.split == "held_out" and every <= 0:
        raise ValueError(
            f"dictionary {path} trained on every row of store {store.root}, so none is held out: "
            "use --split train, or evaluate on another store"
        )
    rule = RowRule(cfg.skip_special, cfg.outlier_factor, every if trained_here else 0)
    sites = list(dict.fromkeys(dictionary_sites(sae)))
    rows = select_rows(store, sites, rule, cfg.split if trained_here else "all", special)
    rows.split = cfg.split  # 'all' of a store it never saw is held out
    return rows


@torch.no_grad()
def _stored_metrics(sae, store, hook_in: str, hook_out: str, keep: torch.Tensor, cfg, ctx) -> dict[str, Any]:
    """One pass over the store: reconstruction stats, L0 per token and AFA norms."""
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    stats = M.ReconstructionStats(W_dec.shape[-1], sae.cfg.d_sae)
    norms: dict[str, list[torch.Tensor]] = {}
    l0s = []
    for i in ctx.progress(range(store.n_shards(hook_in)), desc=f"sae-eval {hook_in}"):
        rec = store.records(hook_in)[i]
        mask = keep[rec.row_start : rec.row_end]
        if not mask.any():
            continue
        x = store.shard(hook_in, i)[mask].float().flatten(1)  # [rows, d] ([n_heads, d_head] sites flattened)
        target = x if hook_out == hook_in else store.shard(hook_out, i)[mask].float().flatten(1)
        for lo in range(0, len(x), cfg.token_batch):
            f = sae.encode(x[lo : lo + cfg.token_batch])
            x_hat, t = sae.decode(f), target[lo : lo + cfg.token_batch]
            stats.add(t, x_hat, f)
            l0s.append(M.l0(f))
            for k, v in M.afa_norms(f, t, W_dec, b_dec).items():
                norms.setdefault(k, []).append(v)
    l0 = torch.cat(l0s) if l0s else torch.zeros(0)
    return {"stats": stats, "l0": l0, "afa": {k: torch.cat(v) for k, v in norms.items()}}


@torch.no_grad()
def _fvu_over(sae, store, hook_in: str, hook_out: str, mask: torch.Tensor, batch: int) -> tuple[float, int]:
    """(FVU, rows) of the reconstruction over the rows of `mask` (no other metric)."""
    stats = M.ReconstructionStats(math.prod(store.shape(hook_out)))
    for i, rec in enumerate(store.records(hook_in)):
        m = mask[rec.row_start : rec.row_end]
        if not m.any():
            continue
        x = store.shard(hook_in, i)[m].float().flatten(1)
        y = x if hook_out == hook_in else store.shard(hook_out, i)[m].float().flatten(1)
        for lo in range(0, len(x), batch):
            stats.add(y[lo : lo + batch], sae.decode(sae.encode(x[lo : lo + batch])))
    return stats.fvu(), stats.n


def _excluded(store, keep: torch.Tensor, everything: torch.Tensor, special: list[int]) -> dict[str, int]:
    """Special-token and outlier rows left out of the scored span (BOS rows are never in it)."""
    tok = store.token_ids()
    special_rows = everything & torch.isin(tok, torch.tensor(special, dtype=tok.dtype))
    return {
        "special_excluded": int(special_rows.sum()),
        "outliers_excluded": int((everything & ~keep & ~special_rows).sum()),
    }


def _afa_row(afa: dict[str, torch.Tensor], eps: float) -> dict[str, float]:
    ratio = afa["ratio"]
    return {
        "afa_ratio_mean": float(ratio.mean()),
        "afa_ratio_median": float(ratio.median()),
        "afa_ratio_centered_median": float(afa["ratio_centered"].median()),
        "afa_eps_lbo_median": float(afa["eps_lbo"].median()),
        "afa_frac_within_bound": float(M.afa_within_bound(afa, eps).float().mean()),
    }


def _check_store(store, hook_in: str, hook_out: str, path: str) -> None:
    missing = [s for s in {hook_in, hook_out} if s not in store.sites]
    if missing:
        raise ValueError(
            f"store {store.root} lacks site(s) {missing} needed by dictionary {path}; "
            f"it holds {store.sites}: capture them with `workbench capture --sites {','.join(sorted({hook_in, hook_out}))}`"
        )


def evaluate(sae, path: str, store, model, cfg: SaeEvalConfig, ctx: Context) -> tuple[dict, dict]:
    """Row of metrics and per-latent/per-token tensors for one dictionary."""
    hook_in, hook_out = dictionary_sites(sae)
    _check_store(store, hook_in, hook_out, path)
    check_store(sae, store, path)  # model, weight processing and widths (sae.compat)
    special = special_token_ids(store) if cfg.skip_special else []
    rows = eval_rows(sae, store, cfg, path, special)
    keep, everything = first_span(rows, cfg.n_tokens)
    out = _stored_metrics(sae, store, hook_in, hook_out, keep, cfg, ctx)
    fvu_all, n_all = _fvu_over(sae, store, hook_in, hook_out, everything, cfg.token_batch)
    stats, freq = out["stats"], out["stats"].frequency()
    max_cos = M.max_abs_cosine(sae.W_dec.detach())
    transcoder = hook_in != hook_out
    row = {
        "dictionary": path,
        "architecture": sae.cfg.architecture(),
        "kind": "transcoder" if transcoder else "sae",
        "site": hook_in,
        "site_out": hook_out,
        "layer": layer_of(hook_out),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "split": rows.split,
        "n_tokens": stats.n,
        "n_tokens_all_but_bos": n_all,
        **_excluded(store, keep, everything, special),
        "l0": stats.l0(),
        "l1": stats.l1(),
        "mse": stats.mse(),
        "fvu": stats.fvu(),
        "fvu_all_but_bos": fvu_all,
        "explained_variance": stats.explained_variance(),
        "cossim": stats.cossim(),
        **M.frequency_summary(freq),
        "mean_max_abs_cos": float(max_cos.mean()),
        "frac_max_abs_cos_over_0.9": float((max_cos > 0.9).float().mean()),
        **_afa_row(out["afa"], float(max_cos.max())),
    }
    if cfg.n_seqs > 0 and model is not None:
        tokens, own = splice_inputs(store, rows, cfg.n_seqs, special)
        limits = {site: cfg.outlier_factor * m for site, m in rows.medians.items()}
        row.update(splice_metrics(model, sae, tokens, hook_in, hook_out, cfg.batch_size, own, limits))
        if transcoder:
            row["replacement_loss"] = row["ce_loss_with_sae"]
    if transcoder:
        row["mlp_out_fvu"] = row["fvu"]
    tensors = {"frequency": freq, "max_cos": max_cos, "l0": out["l0"]}
    tensors |= {"afa_ratio": out["afa"]["ratio"], "afa_ratio_centered": out["afa"]["ratio_centered"]}
    tensors["x_norm"] = out["afa"]["z_norm"]
    return row, tensors


FORMULAS = {
    "fvu": M.FVU_FORMULA,
    "ce_loss_score": M.CE_FORMULA,
    "kl_div_score": "(KL_zero_ablate - KL_spliced) / KL_zero_ablate, KL = KL(clean || new) per next-token prediction",
    "l0": "mean over tokens of #{latents != 0}",
    "afa_ratio": "||f~||_2 / ||x||_2 per token, f~_i = f_i ||W_dec,i|| with ||b_dec|| appended; expectation 1 (AFA)",
    "afa_ratio_centered": "||f~||_2 / ||x - b_dec||_2 per token (no b_dec atom): the norm top-AFA's k* matches",
    "afa_frac_within_bound": "fraction of tokens with | ||x||^2 - ||f~||^2 | <= eps (||f~||_1^2 - ||f~||_2^2), "
    "eps = max off-diagonal |cos| of the decoder",
    "frac_never_fired": "fraction of latents that fire on none of the evaluated tokens (SAEBench's frac_dead; "
    "not the training window's dead latents)",
    "fvu_all_but_bos": "FVU over the same span of text with special tokens and norm outliers kept in (BOS left out)",
    "rows": "special tokens (BOS, EOS/PAD ids) and rows with norm > outlier_factor x the site's median norm "
    "are left out of every stored metric and keep their own activation in the splice",
}


@register("sae-eval", version=3)
def run(cfg: SaeEvalConfig, ctx: Context) -> SaeEvalResult:
    """Evaluate SAEs/transcoders: L0, FVU, CE recovered, KL, dead/dense latents, decoder cosines, AFA."""
    paths = [p.strip() for p in cfg.dictionary.split(",") if p.strip()]
    if not paths or not cfg.store:
        raise ValueError(
            "sae-eval needs --dictionary (a SAELens folder) and --store (activations of its site)"
        )
    store = ctx.store(cfg.store)
    saes = [load_dictionary(path) for path in paths]
    for sae, path in zip(saes, paths):  # a mismatched dictionary is refused before the model loads
        _check_store(store, *dictionary_sites(sae), path)
        check_store(sae, store, path)
    model_key = cfg.model or store.config["model"]
    model = ctx.model(model_key, store.config.get("processing", "raw")) if cfg.n_seqs > 0 else None
    table, tensors = (
        [],
        {k: {} for k in ("frequency", "max_cos", "afa_ratio", "afa_ratio_centered", "x_norm", "l0")},
    )
    for i, (path, sae) in enumerate(zip(paths, saes)):
        row, arrays = evaluate(sae, path, store, model, cfg, ctx)
        table.append(row)
        for name, value in arrays.items():
            tensors[name][str(i)] = value
    return SaeEvalResult(
        store=str(store.root),
        model=model_key,
        table=table,
        formulas=FORMULAS,
        frequency=tensors["frequency"],
        max_cos=tensors["max_cos"],
        afa_ratio=tensors["afa_ratio"],
        afa_ratio_centered=tensors["afa_ratio_centered"],
        x_norm=tensors["x_norm"],
        l0_per_token=tensors["l0"],
    )
