"""SNMF of MLP activations: sparse neuron combinations, read through contexts and the vocabulary.

Shafran, Geiger, Geva 2025, "Decomposing MLP activations into interpretable features via
semi-nonnegative matrix factorization" (arXiv 2506.10920). A store site's rows A [n_tokens, d_mlp]
(BOS excluded, as the paper does) are factorised A ≈ G Fᵀ by `sae.snmf.SNMF` (F mixed-sign with
⌈sparsity·d_mlp⌉ neurons per feature, G ≥ 0). Per feature the result keeps its top activating
contexts (features.top_contexts), its top neurons (largest |F|), its vocabulary projection
(W_U · norm-folded W_out[layer]ᵀ F[:, k], top ± tokens; dashboards/logits.py) and its density
(features.DENSITY_RULE). The fit is also saved as a SAELens dictionary folder of architecture
"snmf" (sae/snmf_dictionary.py), so the Feature explorer, dashboards and prompt lens read SNMF
features like SAE latents, and `snmf-steering` steers with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from workbench.analyses.dashboards.compute import directions, logits_and_neighbors
from workbench.analyses.dashboards.logits import NOTE as LOGIT_NOTE
from workbench.analyses.snmf import features, tree
from workbench.analyses.snmf.result import SNMFResult
from workbench.analysis import register
from workbench.context import Context
from workbench.inputs import input_field
from workbench.sae.snmf import SNMF, check_params, check_rank
from workbench.sites import layer_of

__all__ = ["SNMFConfig", "SNMFResult", "run"]


@dataclass(frozen=True)
class SNMFConfig:
    store: str = input_field("store")
    """Activation store holding the site (capture one with `workbench capture --sites blocks.N.mlp.hook_post`)."""
    site: str = ""
    """Site factorised; empty = the store's first mlp.hook_post site (else its first site)."""
    model: str = input_field("model")
    """Model for W_out, W_U and the tokenizer; empty = the store's model (and weight processing)."""
    rank: int = 50
    """Number of SNMF features K (the paper's scripts use 50; its default is 100)."""
    sparsity: float = 0.01
    """Fraction of neurons kept per feature by the winner-take-all step, in (0, 1]; 1 = plain semi-NMF."""
    init: Literal["random", "svd", "kmeans"] = "random"
    """Initialisation of G (random is the paper's default)."""
    max_iter: int = 300
    """Most iterations."""
    patience: int = 50
    """Stop after this many iterations without a loss decrease larger than tol."""
    tol: float = 1e-4
    """Absolute loss decrease that resets the patience counter (the paper's 1e-4)."""
    n_tokens: int = 20000
    """Store rows fitted (the first ones, BOS excluded); 0 = all (the fit is full-batch: n × d_mlp floats)."""
    seed: int = 0
    """Seed of the initialisation."""
    n_top: int = 10
    """Top activating contexts kept per feature."""
    n_neurons: int = 10
    """Top neurons (largest |F|) listed per feature."""
    window_before: int = 12
    """Context tokens shown before the activating token."""
    window_after: int = 4
    """Context tokens shown after the activating token."""
    tree_ranks: str = ""
    """Coarser ranks for Hierarchical SNMF, decreasing below rank (e.g. '20,5'): the features are then
    level 1 of the end-to-end fine-tuned hierarchy and the result holds the concept tree; empty = one flat fit."""

    def __post_init__(self):
        check_params(self.rank, self.sparsity, self.init, self.max_iter, self.patience, self.tol)
        tree.parse_ranks(self.rank, self.tree_ranks)


def _site(cfg: SNMFConfig, store) -> str:
    if cfg.site:
        return store.site(cfg.site)  # readable error naming the held sites
    mlp = [s for s in store.sites if s.endswith("mlp.hook_post")]
    return mlp[0] if mlp else store.sites[0]


def site_warning(site: str) -> str:
    """'' for an MLP activation site; otherwise what the reader should know."""
    if site.endswith("mlp.hook_post"):
        return ""
    return (
        f"{site} is not an MLP activation (mlp.hook_post): SNMF runs on any site, but the paper's reading "
        "(features as sparse neuron combinations, vocabulary projection through W_out) assumes one"
    )


def metadata(store, site: str, cfg: SNMFConfig, loss: float) -> dict:
    from workbench.sae.compat import identity_metadata  # model id, processing, store: one place

    meta = identity_metadata(store.config, store.root) | {"hook_name": site}
    meta["workbench"] |= {
        "store_fingerprint": store.fingerprint,
        "snmf": {
            "rank": cfg.rank,
            "sparsity": cfg.sparsity,
            "init": cfg.init,
            "seed": cfg.seed,
            "loss": loss,
        },
    }
    return meta


@register("snmf", version=2)
def run(cfg: SNMFConfig, ctx: Context) -> SNMFResult:
    """SNMF features of an MLP site: top contexts, neurons, vocabulary projection, density; saved as a dictionary."""
    if not cfg.store:
        raise ValueError("snmf needs --store (an activation store holding an mlp.hook_post site)")
    store = ctx.store(cfg.store)
    site = _site(cfg, store)
    rows, A = features.fit_rows(store, site, cfg.n_tokens, True, ctx.progress)
    check_rank(cfg.rank, *A.shape)  # before the model loads
    model_key = cfg.model or store.config["model"]
    model = ctx.model(model_key, store.config.get("processing", "raw"))
    F, G, fit, hier = _fit(A, cfg, ctx)
    total = float((A - A.mean(0)).pow(2).sum())
    token_ids = store.token_ids()
    ctxs = features.top_contexts(
        G, rows, token_ids, store.config["ctx_len"], cfg.n_top, cfg.window_before, cfg.window_after
    )
    neuron_ids, neuron_weights = features.top_neurons(F, cfg.n_neurons)
    dictionary = save(F, fit["loss"], store, site, cfg, ctx)
    from workbench.sae.io import load_dictionary

    D, how = directions(load_dictionary(dictionary), model, site)
    logits = logits_and_neighbors(D, model, cfg.rank, F.T)
    # no NaN in a result (NaN != NaN breaks equality of cached copies): missing neighbours (rank < 8)
    # and missing logits (no output direction) keep id -1 and value 0
    logits = {k: v.nan_to_num(0.0) if v.is_floating_point() else v for k, v in logits.items()}
    used = torch.cat(
        [
            ctxs["ctx_tokens"].flatten(),
            logits["top_logit_ids"].flatten(),
            logits["bottom_logit_ids"].flatten(),
        ]
    )
    tree_labels = tree.labels(hier, model, layer_of(site)) if hier is not None else {}
    used = torch.cat([used, torch.tensor([t for ids in tree_labels.values() for t in ids], dtype=torch.long)])
    decoded = {str(int(t)): model.tokenizer.decode([int(t)]) for t in used.unique() if t >= 0}
    return SNMFResult(
        site=site,
        model=model_key,
        layer=layer_of(site),
        rank=cfg.rank,
        sparsity=cfg.sparsity,
        n_tokens=len(A),
        d_mlp=A.shape[1],
        dictionary=dictionary,
        warning=site_warning(site),
        rows_note="fitted rows: the store's first n_tokens real tokens, BOS (position 0) excluded as in the paper",
        density_rule=features.DENSITY_RULE,
        logit_note=f"{how}; {LOGIT_NOTE}" if D is not None else how,
        loss=fit["loss"],
        fvu=fit["loss"] / max(total, 1e-30),
        n_iter=len(fit["curve"]),
        decoded=decoded,
        window_before=cfg.window_before,
        tree_ranks=hier.ranks if hier is not None else [],
        tree=hier.tree() if hier is not None else [],
        tree_labels=tree_labels,
        loss_curve=torch.tensor(fit["curve"], dtype=torch.float64),
        neuron_ids=neuron_ids,
        neuron_weights=neuron_weights,
        **ctxs,
        **features.density(G),
        **logits,
    )


def _fit(A: torch.Tensor, cfg: SNMFConfig, ctx: Context):
    """(F [d_mlp, rank], G [n, rank] ≥ 0, {loss, curve}, the SNMFTree or None).

    Flat: the SNMF loss per iteration. Hierarchical: the fine-tuning's MSE per Adam step."""
    params = {"sparsity": cfg.sparsity, "init": cfg.init, "max_iter": cfg.max_iter}
    params |= {"patience": cfg.patience, "tol": cfg.tol, "seed": cfg.seed}
    if cfg.tree_ranks:
        F, G, hier = tree.fit_tree(A, tree.parse_ranks(cfg.rank, cfg.tree_ranks), params)
        return F, G, {"loss": float(hier.loss), "curve": list(hier.finetune_curve)}, hier
    est = SNMF(cfg.rank, **params).fit(A, progress=ctx.progress)
    fit = {"loss": float(est.loss_), "curve": list(est.loss_curve_)}
    return est.components_.float(), est.coef_.float(), fit, None


def save(F: torch.Tensor, loss: float, store, site: str, cfg: SNMFConfig, ctx: Context) -> str:
    """The fit as a SAELens folder under $WORKBENCH_HOME/dictionaries/<this run's key>."""
    from workbench.sae.io import dictionaries_dir, save_dictionary
    from workbench.sae.snmf_dictionary import to_dictionary

    sae = to_dictionary(F, metadata(store, site, cfg, loss))
    return str(save_dictionary(sae, dictionaries_dir() / ctx.work_dir.name))


from workbench.analyses.snmf import steering as _steering  # noqa: E402, F401  (registers snmf-steering)
