"""Feature dashboards for every latent of a dictionary, or every neuron of a site, from the store.

In the style of Anthropic's "Towards Monosemanticity" feature pages and SAEDashboard/Neuronpedia
(ecosystem.md §4.3, §6.2): top activating contexts with per-token activations, samples from
activation quantile intervals, activation density and histogram, the top ± output logits of the
latent's output direction (W_dec · W_U for dictionaries; W_out[layer] · W_U for MLP neurons; the
unembedding is used as loaded, so the final norm is folded in only for 'compat' stores), the
nearest latents by decoder cosine, and the most correlated latents by activation over the scanned
tokens (Pearson r, up to 8192 latents). Raw neurons ("neuron dashboards") use the same code with the
stored site value as the activation. A latent 'fires' on a token when its activation is > 0.

Three streaming passes over the store's shards, memory bounded by one shard × latents:
1. density, mean, a running top-k per latent (torch.topk over the kept and new candidates) and
   the co-activation sums (Σa, Σaᵀa) behind the correlations;
2. the activation histogram on [0, max] and quantile samples (random-key top-k per interval);
3. the activations of every latent on its context windows (only the rows those windows touch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.analyses.dashboards.compute import (
    N_BINS,
    Latents,
    directions,
    logits_and_neighbors,
    pass_hist_quantiles,
    pass_top,
    store_batches,
    windows,
)
from workbench.analyses.dashboards.neuronpedia import export_neuronpedia
from workbench.analyses.dashboards.result import DashboardResult
from workbench.analyses.sae_eval import check_processing, dictionary_sites, load_dictionary
from workbench.analysis import register
from workbench.context import Context
from workbench.inputs import input_field

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
    if sae is not None and cfg.site and cfg.site != dictionary_sites(sae)[0]:
        raise ValueError(f"dictionary reads {dictionary_sites(sae)[0]}, not --site {cfg.site}")
    store.records(site)  # readable error when the store lacks the site
    if sae is not None:
        check_processing(sae, store)
    return sae, site


@register("dashboards", version=3)
def run(cfg: DashboardConfig, ctx: Context) -> DashboardResult:
    """Feature/neuron dashboards: top and quantile contexts, density, histogram, ± logits, neighbours."""
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

    top = pass_top(batches("dashboards: top-k"), acts_of, n, cfg.n_top)
    max_act = top["top_acts"][:, 0].clone()
    counts, q_acts, q_rows, q_counts = pass_hist_quantiles(
        batches("dashboards: quantiles"), acts_of, max_act, cfg.n_quantiles, cfg.quantile_samples, cfg.seed
    )
    centers = torch.cat([top["top_rows"], q_rows], 1)
    tokens, acts = windows(store, site, acts_of, centers, cfg.window_before, cfg.window_after, token_ids)
    D, note = directions(sae, model, site)
    W_cos = sae.W_dec.detach() if sae is not None else D if D is not None and len(D) == width else None
    extra = logits_and_neighbors(D, model.W_U.detach().float(), n, W_cos)
    used = torch.cat(
        [tokens.flatten(), extra["top_logit_ids"].flatten(), extra["bottom_logit_ids"].flatten()]
    ).unique()
    decoded = {str(int(t)): model.tokenizer.decode([int(t)]) for t in used if t >= 0}
    k = cfg.n_top
    return DashboardResult(
        site=site,
        source=cfg.dictionary or "neurons",
        model=model_key,
        n_latents=n,
        n_tokens=int(top["count"]),
        decoded=decoded,
        logit_note=note + " (unembedding as loaded: final norm folded only for 'compat' stores)",
        window_before=cfg.window_before,
        quantile_samples=cfg.quantile_samples,
        density=top["density"],
        max_act=max_act,
        mean_act=top["mean_act"],
        top_acts=top["top_acts"],
        top_rows=top["top_rows"],
        ctx_tokens=tokens[:, :k],
        ctx_acts=acts[:, :k],
        quantile_acts=q_acts,
        quantile_rows=q_rows,
        quantile_counts=q_counts,
        quantile_ctx_tokens=tokens[:, k:],
        quantile_ctx_acts=acts[:, k:],
        hist_counts=counts,
        hist_edges=max_act[:, None] * torch.linspace(0, 1, N_BINS + 1)[None],
        corr_neighbors=top["corr_neighbors"],
        corr_values=top["corr_values"],
        **extra,
    )
