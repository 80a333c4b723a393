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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.analysis import Result, register
from workbench.context import Context
from workbench.inputs import input_field
from workbench.sae import metrics as M
from workbench.sae.compat import check_store
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
    skip_bos: bool = True
    """Leave position 0 out of every metric and keep its original activation in the splice (SAELens'
    exclude_special_tokens); the zero-ablation baseline ablates all positions, as SAELens does."""


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


def _rows_kept(store, n_tokens: int, skip_bos: bool) -> torch.Tensor:
    """Bool [n_rows]: the first n_tokens rows, position 0 left out when skip_bos."""
    keep = store.token_ids() >= 0
    if skip_bos:
        keep &= torch.tensor(store.tokens().column("pos").to_numpy()) != 0
    keep &= keep.cumsum(0) <= n_tokens
    return keep


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
    return {"stats": stats, "l0": torch.cat(l0s), "afa": {k: torch.cat(v) for k, v in norms.items()}}


def _replacement_hooks(sae, hook_in: str, hook_out: str, skip_bos: bool) -> list:
    """Hooks that replace the output site by the dictionary's reconstruction of the input site."""
    saved: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        saved["x"] = act
        return act

    def replace(act, hook):
        x = saved.get("x", act)
        new = sae.decode(sae.encode(x.float().flatten(2))).reshape(act.shape).to(act.dtype)
        if skip_bos:
            new[:, 0] = act[:, 0]
        return new

    return [(hook_out, replace)] if hook_in == hook_out else [(hook_in, grab), (hook_out, replace)]


@torch.no_grad()
def splice_metrics(
    model, sae, tokens: torch.Tensor, hook_in: str, hook_out: str, batch_size: int, skip_bos: bool
):
    """CE (clean, spliced, zero-ablated) and KL (spliced, ablated) averaged over next-token predictions.

    tokens: [n_seq, pos]. Losses are per prediction [n_seq, pos-1]; KL per position [n_seq, pos];
    with skip_bos the predictions made at position 0 are left out, as SAELens does for special tokens.
    """
    sums = dict.fromkeys(["ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl"], 0.0)
    n_ce = n_kl = 0
    zero = [(hook_out, lambda act, hook: torch.zeros_like(act))]
    for lo in range(0, len(tokens), batch_size):
        batch = tokens[lo : lo + batch_size]
        clean_logits, ce_clean = model(batch, return_type="both", loss_per_token=True)
        kw = {"return_type": "both", "loss_per_token": True}
        sae_logits, ce_sae = model.run_with_hooks(
            batch, fwd_hooks=_replacement_hooks(sae, hook_in, hook_out, skip_bos), **kw
        )
        abl_logits, ce_abl = model.run_with_hooks(batch, fwd_hooks=zero, **kw)
        kl_sae, kl_abl = M.kl_per_token(clean_logits, sae_logits), M.kl_per_token(clean_logits, abl_logits)
        s = 1 if skip_bos else 0
        for name, v in (("ce_clean", ce_clean), ("ce_sae", ce_sae), ("ce_abl", ce_abl)):
            sums[name] += float(v[:, s:].double().sum())
        for name, v in (("kl_sae", kl_sae), ("kl_abl", kl_abl)):
            sums[name] += float(v[:, s:].double().sum())
        n_ce += ce_clean[:, s:].numel()
        n_kl += kl_sae[:, s:].numel()
    ce = {k: sums[k] / n_ce for k in ("ce_clean", "ce_sae", "ce_abl")}
    kl = {k: sums[k] / n_kl for k in ("kl_sae", "kl_abl")}
    return {
        "ce_loss_without_sae": ce["ce_clean"],
        "ce_loss_with_sae": ce["ce_sae"],
        "ce_loss_with_ablation": ce["ce_abl"],
        "ce_loss_score": M.ce_loss_score(ce["ce_clean"], ce["ce_sae"], ce["ce_abl"]),
        "kl_div_with_sae": kl["kl_sae"],
        "kl_div_with_ablation": kl["kl_abl"],
        "kl_div_score": (kl["kl_abl"] - kl["kl_sae"]) / kl["kl_abl"] if kl["kl_abl"] else float("nan"),
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
    keep = _rows_kept(store, cfg.n_tokens, cfg.skip_bos)
    out = _stored_metrics(sae, store, hook_in, hook_out, keep, cfg, ctx)
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
        "n_tokens": stats.n,
        "l0": stats.l0(),
        "l1": stats.l1(),
        "mse": stats.mse(),
        "fvu": stats.fvu(),
        "explained_variance": stats.explained_variance(),
        "cossim": stats.cossim(),
        **M.frequency_summary(freq),
        "mean_max_abs_cos": float(max_cos.mean()),
        "frac_max_abs_cos_over_0.9": float((max_cos > 0.9).float().mean()),
        **_afa_row(out["afa"], float(max_cos.max())),
    }
    if cfg.n_seqs > 0 and model is not None:
        ctx_len = store.config["ctx_len"]
        tokens = store.token_ids()[: cfg.n_seqs * ctx_len].reshape(-1, ctx_len)
        row.update(splice_metrics(model, sae, tokens, hook_in, hook_out, cfg.batch_size, cfg.skip_bos))
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
    "frac_dead": "fraction of latents that fire on none of the evaluated tokens",
}


@register("sae-eval", version=2)
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
