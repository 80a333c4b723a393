"""Feature dashboards for every latent of a dictionary, or every neuron of a site, from the store.

In the style of Anthropic's "Towards Monosemanticity" feature pages and SAEDashboard/Neuronpedia
(ecosystem.md §4.3, §6.2): top activating contexts with per-token activations (one per distinct
token window), top negative contexts for units that take both signs (SwiGLU neurons), samples from
activation intervals, firing density and histogram, the top ± logit effects of the unit's output
direction (W_dec for dictionaries, W_out[layer] for MLP neurons) through the final norm's gain
(logits.py: the same numbers as SAEDashboard on a norm-folded model, in raw and compat mode), the
nearest latents by decoder cosine, and the most correlated latents by activation over the scanned
tokens (Pearson r, up to 8192 latents). Raw neurons ("neuron dashboards") use the same code with the
stored site value as the activation. When a unit fires: workbench.firing (stated in the result).

Three streaming passes over the store's shards, memory bounded by one shard × latents:
1. range (min, max), running top positive and top negative examples per latent, one per token
   window (topk.UniqueTopK), and the co-activation sums (Σa, Σaᵀa) behind the correlations;
2. firing density from the range, the histogram on [min(0, min), max] and quantile samples
   (random-key top-k per interval);
3. the activations of every latent on its context windows (only the rows those windows touch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.analyses.dashboards.compute import (
    Latents,
    directions,
    logits_and_neighbors,
    pass_hist_quantiles,
    pass_top,
    store_batches,
    windows,
)
from workbench.analyses.dashboards.logits import NOTE as LOGIT_NOTE
from workbench.analyses.dashboards.neuronpedia import export_neuronpedia
from workbench.analyses.dashboards.result import DashboardResult
from workbench.analyses.dashboards.topk import window_hashes
from workbench.analyses.sae_eval import dictionary_sites, load_dictionary
from workbench.analysis import register
from workbench.context import Context
from workbench.firing import RULE as FIRING_RULE
from workbench.inputs import input_field
from workbench.sae.compat import check_store

__all__ = ["DashboardConfig", "DashboardResult", "export_neuronpedia", "run"]


@dataclass(frozen=True)
class DashboardConfig:
    store: str = input_field("store")
    """Activation store holding the site."""
    site: str = ""
    """Hook name whose activations are read; empty = the dictionary's input site."""
    dictionary: str = input_field("dictionary")
    """SAELens dictionary folder; empty = the raw neurons of the site (neuron dashboards)."""
    model: str = input_field("model")
    """Model for W_U and the tokenizer; empty = the store's model (and weight processing)."""
    n_top: int = 20
    """Top activating contexts kept per latent."""
    n_quantiles: int = 5
    """Activation intervals (0, max] is split into, for quantile samples."""
    quantile_samples: int = 5
    """Random contexts sampled per interval."""
    window_before: int = 16
    """Context tokens shown before the activating token."""
    window_after: int = 4
    """Context tokens shown after the activating token."""
    latents: int = 0
    """Dashboards for the first N latents; 0 = all."""
    n_tokens: int = 0
    """Stored tokens scanned; 0 = all."""
    skip_bos: bool = True
    """Never pick position 0 (BOS, attention sink with massive activations) as an example."""
    token_batch: int = 1024
    """Rows encoded per step."""
    seed: int = 0
    """Seed of the quantile sampling."""


def _resolve(cfg: DashboardConfig, store):
    sae = load_dictionary(cfg.dictionary) if cfg.dictionary else None
    site = cfg.site or (dictionary_sites(sae)[0] if sae is not None else "")
    if not site:
        raise ValueError("dashboards needs --site (neuron dashboards) or --dictionary")
    site = store.site(site)  # the stored (canonical) name, aliases accepted; readable error when absent
    if sae is not None and cfg.site and site != store.site(dictionary_sites(sae)[0]):
        raise ValueError(f"dictionary reads {dictionary_sites(sae)[0]}, not --site {cfg.site}")
    if sae is not None:
        check_store(sae, store, cfg.dictionary)  # model, processing and width, before any pass
    return sae, site


@register("dashboards", version=4)
def run(cfg: DashboardConfig, ctx: Context) -> DashboardResult:
    """Feature/neuron dashboards: top ± and quantile contexts, firing density, histogram, ± logits, neighbours."""
    if not cfg.store:
        raise ValueError("dashboards needs --store (an activation store holding the site)")
    store = ctx.store(cfg.store)
    sae, site = _resolve(cfg, store)
    model_key = cfg.model or store.config["model"]
    model = ctx.model(model_key, store.config.get("processing", "raw"))
    width = sae.cfg.d_sae if sae is not None else int(torch.tensor(store.shape(site)).prod())
    n = min(cfg.latents, width) if cfg.latents > 0 else width
    acts_of = Latents(sae, n, cfg.token_batch)
    token_ids = store.token_ids()
    keep = token_ids >= 0
    if cfg.skip_bos:
        keep &= torch.tensor(store.tokens().column("pos").to_numpy()) != 0
    if cfg.n_tokens > 0:
        keep &= keep.cumsum(0) <= cfg.n_tokens

    def batches(desc):
        return store_batches(store, site, keep, cfg.token_batch, ctx, desc)

    hashes = window_hashes(token_ids, store.config["ctx_len"], cfg.window_before, cfg.window_after)
    top = pass_top(batches("dashboards: top-k"), acts_of, n, cfg.n_top, hashes)
    lo, hi = top["min_act"].clamp(max=0), top["max_act"].clamp(min=0)
    stats = pass_hist_quantiles(
        batches("dashboards: quantiles"), acts_of, lo, hi, cfg.n_quantiles, cfg.quantile_samples, cfg.seed
    )
    k = cfg.n_top
    centers = torch.cat([top["top_rows"], top["neg_rows"], stats["quantile_rows"]], 1)
    tokens, acts = windows(store, site, acts_of, centers, cfg.window_before, cfg.window_after, token_ids)
    D, how = directions(sae, model, site)
    W_cos = sae.W_dec.detach() if sae is not None else D if D is not None and len(D) == width else None
    extra = logits_and_neighbors(D, model, n, W_cos)
    used = torch.cat(
        [tokens.flatten(), extra["top_logit_ids"].flatten(), extra["bottom_logit_ids"].flatten()]
    ).unique()
    decoded = {str(int(t)): model.tokenizer.decode([int(t)]) for t in used if t >= 0}
    return DashboardResult(
        site=site,
        source=cfg.dictionary or "neurons",
        model=model_key,
        n_latents=n,
        n_tokens=int(top["count"]),
        decoded=decoded,
        logit_note=f"{how}; {LOGIT_NOTE}" if D is not None else how,
        firing_rule=FIRING_RULE,
        window_before=cfg.window_before,
        quantile_samples=cfg.quantile_samples,
        max_act=hi,
        min_act=lo,
        top_acts=top["top_acts"],
        top_rows=top["top_rows"],
        ctx_tokens=tokens[:, :k],
        ctx_acts=acts[:, :k],
        neg_acts=top["neg_acts"],
        neg_rows=top["neg_rows"],
        neg_ctx_tokens=tokens[:, k : 2 * k],
        neg_ctx_acts=acts[:, k : 2 * k],
        quantile_ctx_tokens=tokens[:, 2 * k :],
        quantile_ctx_acts=acts[:, 2 * k :],
        corr_neighbors=top["corr_neighbors"],
        corr_values=top["corr_values"],
        **stats,
        **extra,
    )
