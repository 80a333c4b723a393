"""Dictionary-feature attribution: the patching metric attributed to SAE/transcoder latents and an error node.

The sparse-feature-circuits setting (Marks et al. 2024) that the RelP paper (Jafari et al. 2025, 4.5) scores
with RelP. A dictionary D is spliced into the forward pass at its output site:

    site = x_hat + e,   x_hat = D.decode(f),  f = D.encode(x_in),  e = site - x_hat  (a constant node)

x_in is read at the dictionary's `hook_name` and the splice sits at `hook_name_out` (the same hook for an
SAE; the MLP output for a transcoder that reads the MLP input). The splice is written so its value is the
site's own tensor bit for bit (site.detach() plus two exact zeros carrying the graphs of f and e), so the
forward pass is unchanged. Attribution, with the gradient taken on the base run (corrupted when denoising)
and plain (AtP) or through `workbench.lrp.rules` (RelP):

    latent_i = sum_pos (f_i^source - f_i^base) dM/df_i,    error = sum_pos (e^source - e^base) . dM/de

For an affine decoder, sum_i latent_i + error equals the site's own AtP (RelP) score exactly up to rounding:
the dictionary only splits the site's attribution.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from urllib.parse import urlencode

import torch
from jaxtyping import Float

from workbench import lrp
from workbench.analyses.patching.metrics import PromptMetric, logit_diff
from workbench.interventions import hook_points, hooked, model_lock
from workbench.tasks import Group, TokenizedTask

FEATURE_METHODS = ("atp", "relp")


class FeatureAttributionError(ValueError):
    """A dictionary, method or option the attribution cannot use; raised before the gradient runs."""


@dataclass
class FeatureScores:
    """Per-prompt attributions of the metric to the latents and the error node of one spliced dictionary."""

    latents: Float[torch.Tensor, "prompt d_sae"]
    error: Float[torch.Tensor, " prompt"]
    site: Float[torch.Tensor, " prompt"]
    """The whole site's AtP/RelP score, (a^source - a^base) . dM/da: latents.sum(-1) + error."""
    hook_in: str
    hook_out: str
    method: str
    dictionary: str = ""
    baselines: dict[str, float] = field(default_factory=dict)

    def top(self, k: int = 20) -> list[tuple[int, float]]:
        """The k latents of largest |task-mean score|, as (latent, score), largest first."""
        mean = self.latents.mean(0)
        order = mean.abs().argsort(descending=True)[:k]
        return [(int(i), float(mean[i])) for i in order]

    def dashboard_url(self, latent: int) -> str:
        """The app's feature-explorer page for one latent of this dictionary."""
        return "feature_explorer?" + urlencode({"dictionary": self.dictionary, "latent": int(latent)})


def dictionary_sites(sae) -> tuple[str, str]:
    """(input hook, splice hook) from the dictionary's cfg metadata; equal for an SAE."""
    meta = sae.cfg.metadata
    hook_in = getattr(meta, "hook_name", None)
    if not hook_in:
        raise FeatureAttributionError(
            "dictionary config has no metadata.hook_name; cannot tell which site it reads"
        )
    return hook_in, getattr(meta, "hook_name_out", None) or hook_in


def _check(model, sae, method: str, direction: str) -> None:
    if method not in FEATURE_METHODS:
        raise FeatureAttributionError(f"unknown feature-attribution method '{method}'; choose from atp, relp")
    if direction not in ("denoise", "noise"):
        raise FeatureAttributionError(f"direction must be denoise or noise, got '{direction}'")
    from workbench.sae.compat import processing_of  # one reader of the recorded processing

    theirs = processing_of(sae)
    ours = getattr(getattr(model, "workbench", None), "processing", None)
    if theirs and ours and theirs != ours:
        raise FeatureAttributionError(
            f"dictionary was trained on '{theirs}' activations but the model runs in '{ours}' mode"
        )


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)  # [batch, pos, n_heads, d_head] sites (hook_z) become [batch, pos, d]


class _Splice:
    """Hooks that read x_in and splice D at the output site; keeps f, e, the site and (grad runs) leaves."""

    def __init__(self, sae, hook_in: str, hook_out: str, grad: bool):
        self.sae, self.hook_in, self.hook_out, self.grad = sae, hook_in, hook_out, grad
        self.x_in: torch.Tensor | None = None
        self.kept: dict[str, torch.Tensor] = {}

    def hooks(self) -> list:
        if self.hook_in == self.hook_out:
            return [(self.hook_out, self.splice)]
        return [(self.hook_in, self.read), (self.hook_out, self.splice)]

    def read(self, x: torch.Tensor, hook) -> None:
        self.x_in = x

    def splice(self, site: torch.Tensor, hook) -> torch.Tensor:
        x_in = (site if self.hook_in == self.hook_out else self.x_in).detach().to(self.sae.dtype)
        if _flat(x_in).shape[-1] != self.sae.cfg.d_in:
            raise FeatureAttributionError(
                f"the dictionary reads {self.sae.cfg.d_in}-wide activations but {self.hook_in} is "
                f"{_flat(x_in).shape[-1]} wide on this model"
            )
        with torch.no_grad():  # SAELens' hook_z dictionaries flatten [n_heads, d_head] themselves
            f = self.sae.encode(x_in if getattr(self.sae, "hook_z_reshaping_mode", False) else _flat(x_in))
        flat = _flat(site.detach()).to(self.sae.dtype)
        d_out = getattr(self.sae.cfg, "d_out", None) or self.sae.cfg.d_in
        if flat.shape[-1] != d_out:
            raise FeatureAttributionError(
                f"the dictionary writes {d_out}-wide activations but {self.hook_out} is "
                f"{flat.shape[-1]} wide on this model"
            )
        if not self.grad:
            with torch.no_grad():
                self.kept.update(f=f, e=flat - _flat(self.sae.decode(f)), site=flat)
            return None
        f = f.requires_grad_(True)
        x_hat = _flat(self.sae.decode(f))
        e = (flat - x_hat).detach().requires_grad_(True)
        self.kept.update(f=f, e=e, site=flat)
        # value: the site bit for bit (x - x is exactly 0); graph: d site = d x_hat + d e
        zero = (x_hat - x_hat.detach()) + (e - e.detach())
        return site.detach() + zero.view(site.shape).to(site.dtype)


def feature_attribution(
    model,
    tt: TokenizedTask,
    sae,
    metric: str = "normalized",
    method: str = "relp",
    *,
    direction: str = "denoise",
    rules: tuple[str, ...] = lrp.DEFAULT_RULES,
    ah: bool = False,
    dictionary: str = "",
) -> FeatureScores:
    """Attribute the task metric to `sae`'s latents and error node by AtP or RelP (see the module docstring).

    `sae` is a SAELens SAE/Transcoder (e.g. from `workbench.sae.io.load_dictionary(dictionary)`).
    """
    _check(model, sae, method, direction)
    if method == "relp":
        rules = lrp.check_rules(rules)
    hook_in, hook_out = dictionary_sites(sae)
    points = hook_points(model, [hook_in, hook_out])
    with model_lock(model):
        caches = [_cache(model, sae, g, hook_in, hook_out, points) for g in tt.groups]
        base = _baselines(tt.groups, caches)
        parts = [
            _group_scores(model, sae, g, c, base, metric, method, direction, rules, ah, points)
            for g, c in zip(tt.groups, caches)
        ]
    n = len(tt.pairs)
    latents, error, site = torch.zeros(n, sae.cfg.d_sae), torch.zeros(n), torch.zeros(n)
    for g, (lat, err, tot) in zip(tt.groups, parts):
        latents[g.index], error[g.index], site[g.index] = (
            lat.cpu(),
            err.cpu(),
            tot.cpu(),
        )  # model may be on GPU
    return FeatureScores(latents, error, site, hook_in, hook_out, method, dictionary, base)


def _cache(model, sae, g: Group, hook_in: str, hook_out: str, points: dict) -> dict:
    """Clean and corrupted runs in one batch: f, e and the site [batch, pos, ...] and final-position logits."""
    splice = _Splice(sae, hook_in, hook_out, grad=False)
    with torch.no_grad(), hooked(model, fwd=splice.hooks(), points=points):
        last = model(torch.cat([g.clean, g.corrupted]), return_type="logits")[:, -1].float()
    b = g.clean.shape[0]
    out = {f"clean_{k}": v[:b] for k, v in splice.kept.items()}
    out |= {f"corrupted_{k}": v[b:] for k, v in splice.kept.items()}
    return out | {"clean_last": last[:b], "corrupted_last": last[b:]}


def _baselines(groups: list[Group], caches: list[dict]) -> dict[str, float]:
    ld = {
        run: torch.cat([logit_diff(c[f"{run}_last"], g.answer, g.wrong) for g, c in zip(groups, caches)])
        for run in ("clean", "corrupted")
    }
    return {"ld_clean": float(ld["clean"].mean()), "ld_corrupted": float(ld["corrupted"].mean())}


def _group_scores(model, sae, g, cache, base, metric, method, direction, rules, ah, points):
    """Per-prompt (latents [b, d_sae], error [b], site [b]) for one length group."""
    prompt_metric = PromptMetric(
        metric, g.answer, g.wrong, cache["clean_last"].log_softmax(-1), base["ld_clean"], base["ld_corrupted"]
    )
    src, dst = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
    tokens = g.corrupted if direction == "denoise" else g.clean
    splice = _Splice(sae, *dictionary_sites(sae), grad=True)
    relp = lrp.rules(model, rules, ah=ah) if method == "relp" else nullcontext()
    with torch.enable_grad(), relp, hooked(model, fwd=splice.hooks(), points=points):
        logits = model(tokens, return_type="logits")
        value = prompt_metric(logits[:, -1], torch.arange(tokens.shape[0])).sum()
        grad_f, grad_e = torch.autograd.grad(value, [splice.kept["f"], splice.kept["e"]])
    latents = ((cache[f"{src}_f"] - cache[f"{dst}_f"]) * grad_f).sum(1)
    error = ((cache[f"{src}_e"] - cache[f"{dst}_e"]) * grad_e).sum((1, 2))
    site = ((cache[f"{src}_site"] - cache[f"{dst}_site"]) * grad_e).sum((1, 2))  # d site = d e
    return latents.detach().float(), error.detach().float(), site.detach().float()


MAX_STORED = 1_000_000  # prompt x latent cells kept per method before only the top latents are stored


def pack(scores: dict[str, FeatureScores], top_k: int, max_cells: int = MAX_STORED) -> dict:
    """Result fields of several methods' FeatureScores: small arrays, the top latents and their links.

    `feature_ids` are the latents whose per-prompt scores are kept: all of them when [prompt, d_sae]
    is small, else the union of every method's top_k; '<m>/rest' holds the sum of the others, so
    latents.sum(-1) + rest + error == site per prompt either way."""
    first = next(iter(scores.values()))
    n, d_sae = first.latents.shape
    top = {m: s.top(top_k) for m, s in scores.items()}
    if n * d_sae <= max_cells:
        ids = torch.arange(d_sae)
    else:
        ids = torch.tensor(sorted({i for rows in top.values() for i, _ in rows}), dtype=torch.long)
    arrays: dict[str, torch.Tensor] = {"feature_ids": ids}
    for m, s in scores.items():
        kept = s.latents[:, ids]
        arrays |= {f"{m}/latents": kept, f"{m}/rest": s.latents.sum(-1) - kept.sum(-1)}
        arrays |= {f"{m}/error": s.error, f"{m}/site": s.site}
    return {
        "features": arrays,
        "feature_top": {
            m: [{"latent": i, "score": v, "url": scores[m].dashboard_url(i)} for i, v in rows]
            for m, rows in top.items()
        },
        "feature_hooks": [first.hook_in, first.hook_out],
    }
