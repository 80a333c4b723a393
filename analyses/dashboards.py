"""Feature dashboards for every latent of a dictionary, or every neuron of a site, from the store.

In the style of Anthropic's "Towards Monosemanticity" feature pages and SAEDashboard/Neuronpedia
(ecosystem.md §4.3, §6.2): top activating contexts with per-token activations, samples from
activation quantile intervals, activation density and histogram, the top ± output logits of the
latent's output direction (W_dec · W_U for dictionaries; W_out[layer] · W_U for MLP neurons; the
unembedding is used as loaded, so the final norm is folded in only for 'compat' stores), and the
nearest latents by decoder cosine. Raw neurons ("neuron dashboards") use the same code with the
stored site value as the activation. A latent 'fires' on a token when its activation is > 0.

Three streaming passes over the store's shards, memory bounded by one shard × latents:
1. density, mean, and a running top-k per latent (torch.topk over the kept and new candidates);
2. the activation histogram on [0, max] and quantile samples (random-key top-k per interval);
3. the activations of every latent on its context windows (only the rows those windows touch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analyses.sae_eval import check_processing, dictionary_sites, load_dictionary
from sae.metrics import nearest_by_cosine
from workbench.analysis import Result, register
from workbench.context import Context
from workbench.sites import layer_of

N_BINS, N_LOGITS, N_NEIGHBORS = 32, 10, 8


@dataclass(frozen=True)
class DashboardConfig:
    store: str = ""
    """Activation store holding the site."""
    site: str = ""
    """Hook name whose activations are read; empty = the dictionary's input site."""
    dictionary: str = ""
    """SAELens dictionary folder; empty = the raw neurons of the site (neuron dashboards)."""
    model: str = ""
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


@dataclass
class DashboardResult(Result):
    site: str
    source: str
    """'neurons' or the dictionary path."""
    model: str
    n_latents: int
    n_tokens: int
    decoded: dict[str, str]
    """Token id (as str) -> decoded string, for every id in contexts and logits."""
    logit_note: str
    window_before: int
    quantile_samples: int
    density: torch.Tensor  # [n_latents] fraction of scanned tokens with activation > 0
    max_act: torch.Tensor  # [n_latents]
    mean_act: torch.Tensor  # [n_latents] mean over the tokens where the latent fires
    top_acts: torch.Tensor  # [n_latents, n_top]
    top_rows: torch.Tensor  # [n_latents, n_top] store row of the activating token, -1 = none
    ctx_tokens: torch.Tensor  # [n_latents, n_top, window] token ids, -1 = padding
    ctx_acts: torch.Tensor  # [n_latents, n_top, window]
    quantile_acts: torch.Tensor  # [n_latents, n_quantiles * samples], interval-major
    quantile_rows: torch.Tensor
    quantile_counts: torch.Tensor  # [n_latents, n_quantiles] firing tokens per interval
    quantile_ctx_tokens: torch.Tensor
    quantile_ctx_acts: torch.Tensor
    top_logit_ids: torch.Tensor  # [n_latents, 10], -1 when the site has no output direction
    top_logit_vals: torch.Tensor
    bottom_logit_ids: torch.Tensor
    bottom_logit_vals: torch.Tensor
    neighbors: torch.Tensor  # [n_latents, 8] by decoder (or W_out) cosine, -1 = none
    neighbor_cos: torch.Tensor
    hist_counts: torch.Tensor  # [n_latents, 32] counts of nonzero activations
    hist_edges: torch.Tensor  # [n_latents, 33] from 0 to max_act

    # --- plain-Python views for the app and notebooks ---------------------------------------
    def _tok(self, i: int) -> str:
        return self.decoded.get(str(int(i)), f"<{int(i)}>")

    def _contexts(self, tokens: torch.Tensor, acts: torch.Tensor, values: torch.Tensor) -> list[dict]:
        out = []
        for t, a, v in zip(tokens, acts, values):
            keep = t >= 0
            if not keep.any():
                continue
            out.append(
                {
                    "tokens": [self._tok(x) for x in t[keep]],
                    "acts": a[keep].tolist(),
                    "token_ids": t[keep].tolist(),
                    "max_index": int(self.window_before - (~keep[: self.window_before]).sum()),
                    "act": float(v),
                }
            )
        return out

    def _logits(self, ids: torch.Tensor, vals: torch.Tensor) -> list[tuple[str, float]]:
        return [(self._tok(t), float(v)) for t, v in zip(ids, vals) if t >= 0]

    def latent(self, i: int) -> dict[str, Any]:
        """Everything about latent i as plain Python (contexts, logits, neighbours, histogram)."""
        if not 0 <= i < self.n_latents:
            raise IndexError(f"latent {i} out of range: this result has {self.n_latents} latents")
        s, max_act = self.quantile_samples, float(self.max_act[i])
        n_q = self.quantile_acts.shape[1] // max(s, 1)
        quantiles = []
        for q in range(n_q):
            sl = slice(q * s, (q + 1) * s)
            ctxs = self._contexts(
                self.quantile_ctx_tokens[i, sl], self.quantile_ctx_acts[i, sl], self.quantile_acts[i, sl]
            )
            frac = float(self.quantile_counts[i, q] / self.quantile_counts[i].sum().clamp(min=1))
            lo, hi = q * max_act / n_q, (q + 1) * max_act / n_q
            quantiles.append({"bin_min": lo, "bin_max": hi, "bin_contains": frac, "contexts": ctxs})
        return {
            "latent": i,
            "density": float(self.density[i]),
            "max_act": max_act,
            "mean_act": float(self.mean_act[i]),
            "top": self._contexts(self.ctx_tokens[i], self.ctx_acts[i], self.top_acts[i]),
            "quantiles": quantiles,
            "pos_logits": self._logits(self.top_logit_ids[i], self.top_logit_vals[i]),
            "neg_logits": self._logits(self.bottom_logit_ids[i], self.bottom_logit_vals[i]),
            "neighbors": [
                (int(j), float(c)) for j, c in zip(self.neighbors[i], self.neighbor_cos[i]) if j >= 0
            ],
            "hist": {"counts": self.hist_counts[i].tolist(), "edges": self.hist_edges[i].tolist()},
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per latent for a searchable list."""
        rows = []
        for i in range(self.n_latents):
            centers = self.ctx_tokens[i, :, self.window_before]
            tops = [self._tok(t) for t in centers[centers >= 0][:5]]
            logits = [self._tok(t) for t in self.top_logit_ids[i, :5] if t >= 0]
            rows.append(
                {
                    "latent": i,
                    "density": float(self.density[i]),
                    "max_act": float(self.max_act[i]),
                    "mean_act": float(self.mean_act[i]),
                    "top_tokens": " | ".join(tops),
                    "top_logits": " | ".join(logits),
                }
            )
        return rows

    def summary(self) -> list[dict[str, Any]]:
        d = self.density
        return [
            {
                "site": self.site,
                "source": self.source,
                "n_latents": self.n_latents,
                "n_tokens": self.n_tokens,
                "frac_dead": float((d == 0).float().mean()),
                "median_density": float(d.median()),
                "frac_density_over_10_percent": float((d > 0.1).float().mean()),
            }
        ]

    def figures(self) -> dict:
        import plotly.express as px

        live = self.density[self.density > 0]
        return {
            "latent density": px.histogram(
                x=live.log10().tolist(),
                nbins=50,
                title=f"log10 activation density of live latents ({self.n_latents - len(live)} dead), {self.site}",
                labels={"x": "log10 density"},
            ),
            "density vs max activation": px.scatter(
                x=self.density.tolist(),
                y=self.max_act.tolist(),
                log_x=True,
                hover_name=[f"latent {i}" for i in range(self.n_latents)],
                title="density vs max activation per latent",
                labels={"x": "density", "y": "max activation"},
            ),
        }

    def to_neuronpedia(self, i: int) -> dict[str, Any]:
        """Latent i as one SAEDashboard/Neuronpedia feature (field names of their dataclasses)."""
        d = self.latent(i)
        acts = []
        groups = [(-1.0, float(self.max_act[i]), -1.0, d["top"])]
        groups += [(q["bin_min"], q["bin_max"], q["bin_contains"], q["contexts"]) for q in d["quantiles"]]
        for bin_min, bin_max, contains, ctxs in groups:
            for c in ctxs:
                acts.append(
                    {
                        "tokens": c["tokens"],
                        "values": [round(v, 4) for v in c["acts"]],
                        "maxValue": max(c["acts"]),
                        "maxValueTokenIndex": max(range(len(c["acts"])), key=c["acts"].__getitem__),
                        "minValue": min(c["acts"]),
                        "binMin": bin_min,
                        "binMax": bin_max,
                        "binContains": contains,
                        "bin_min": bin_min,
                        "bin_max": bin_max,
                        "bin_contains": contains,
                    }
                )
        counts, edges = self.hist_counts[i], self.hist_edges[i]
        return {
            "modelId": self.model,
            "layer": layer_of(self.site),
            "index": i,
            "feature_index": i,
            "hookName": self.site,
            "maxActApprox": float(self.max_act[i]),
            "frac_nonzero": float(self.density[i]),
            "pos_str": [t for t, _ in d["pos_logits"]],
            "pos_values": [v for _, v in d["pos_logits"]],
            "neg_str": [t for t, _ in d["neg_logits"]],
            "neg_values": [v for _, v in d["neg_logits"]],
            "topkCosSimIndices": [j for j, _ in d["neighbors"]],
            "topkCosSimValues": [c for _, c in d["neighbors"]],
            "freq_hist_data_bar_heights": counts.tolist(),
            "freq_hist_data_bar_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
            "n_tokens_in_prompt": len(self.ctx_tokens[i, 0]),
            "activations": acts,
        }


def export_neuronpedia(result: DashboardResult, path: str | Path, sae_set: str = "", latents=None) -> Path:
    """Write a SAEDashboard `batch-N.json`-shaped file: {model_id, layer, sae_set, features: [...]}."""
    latents = range(result.n_latents) if latents is None else latents
    batch = {
        "model_id": result.model,
        "layer": layer_of(result.site),
        "sae_set": sae_set or ("neurons" if result.source == "neurons" else Path(result.source).name),
        "features": [result.to_neuronpedia(int(i)) for i in latents],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(batch))
    return path


# --- computation --------------------------------------------------------------------------
class _Latents:
    """Activations of the first n latents on store rows: raw neurons or a dictionary's encoding."""

    def __init__(self, sae, n: int, token_batch: int):
        self.sae, self.n, self.token_batch = sae, n, token_batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [rows, *site] -> [rows, n]
        x = x.reshape(len(x), -1).float()
        if self.sae is None:
            return x[:, : self.n]
        return torch.cat(
            [
                self.sae.encode(x[i : i + self.token_batch])[:, : self.n]
                for i in range(0, len(x), self.token_batch)
            ]
        )


def _batches(store, site: str, keep: torch.Tensor, token_batch: int, ctx: Context, desc: str):
    """(rows [B], x [B, ...]) over the kept rows, shard by shard."""
    for i in ctx.progress(range(store.n_shards(site)), desc=desc):
        rec = store.records(site)[i]
        mask = keep[rec.row_start : rec.row_end]
        if not mask.any():
            continue
        rows, x = torch.arange(rec.row_start, rec.row_end)[mask], store.shard(site, i)[mask]
        for lo in range(0, len(x), token_batch):
            yield rows[lo : lo + token_batch], x[lo : lo + token_batch]


def _merge_topk(vals, rows, cand_vals, cand_rows, k: int, extra=None):
    """Running top-k per latent: topk over the kept [L, k] and the new candidates [L, B]."""
    all_v = torch.cat([vals, cand_vals], 1)
    v, idx = all_v.topk(k, dim=1)
    r = torch.cat([rows, cand_rows.expand(len(vals), -1)], 1).gather(1, idx)
    return v, r, (None if extra is None else torch.cat(extra, 1).gather(1, idx))


def _pass_top(batches, acts_of, n: int, n_top: int) -> dict[str, torch.Tensor]:
    vals, rows = torch.full((n, n_top), -torch.inf), torch.full((n, n_top), -1)
    fires, sums, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    for r, x in batches:
        a = acts_of(x)  # [B, n]
        on = a > 0
        fires += on.sum(0)
        sums += torch.where(on, a, 0).sum(0).double()
        count += len(a)
        vals, rows, _ = _merge_topk(vals, rows, torch.where(on, a, -torch.inf).T, r[None], n_top)
    rows[vals == -torch.inf] = -1
    return {
        "top_acts": vals.clamp(min=0),
        "top_rows": rows,
        "density": (fires / max(count, 1)).float(),
        "mean_act": (sums / fires.clamp(min=1)).float(),
        "count": torch.tensor(count),
    }


def _pass_hist_quantiles(batches, acts_of, max_act: torch.Tensor, n_q: int, s: int, seed: int):
    """Histogram of nonzero activations on [0, max] and s random samples per interval (q/n_q, (q+1)/n_q]·max."""
    n = len(max_act)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n * N_BINS, dtype=torch.long)
    q_counts = torch.zeros(n * n_q, dtype=torch.long)
    keys, rows, vals = (
        torch.full((n, n_q, s), -torch.inf),
        torch.full((n, n_q, s), -1),
        torch.zeros(n, n_q, s),
    )
    scale = torch.where(max_act > 0, max_act, 1.0)
    latent = torch.arange(n) * N_BINS
    for r, x in batches:
        a = acts_of(x)
        on = a > 0
        counts += torch.bincount(
            (latent + (a / scale * N_BINS).long().clamp(0, N_BINS - 1))[on], minlength=n * N_BINS
        )
        interval = ((a / scale * n_q).ceil().long() - 1).clamp(0, n_q - 1)
        q_counts += torch.bincount((torch.arange(n) * n_q + interval)[on], minlength=n * n_q)
        key = torch.rand(a.shape, generator=gen)
        for q in range(n_q):
            cand = torch.where(on & (interval == q), key, -torch.inf).T
            keys[:, q], rows[:, q], vals[:, q] = _merge_topk(
                keys[:, q], rows[:, q], cand, r[None], s, (vals[:, q], a.T)
            )
    rows[keys == -torch.inf] = -1
    vals[keys == -torch.inf] = 0
    return counts.reshape(n, N_BINS), vals.reshape(n, -1), rows.reshape(n, -1), q_counts.reshape(n, n_q)


@torch.no_grad()
def _windows(
    store, site: str, acts_of, centers: torch.Tensor, before: int, after: int, token_ids: torch.Tensor
):
    """Token ids and latent activations on [center − before, center + after] within its sequence.

    centers: [n, S] store rows (-1 = none). Returns tokens, acts: [n, S, before + 1 + after].
    """
    ctx_len, n_rows = store.config["ctx_len"], len(token_ids)
    win = centers[..., None] + torch.arange(-before, after + 1)  # [n, S, W]
    valid = (
        (centers[..., None] >= 0)
        & (win >= 0)
        & (win < n_rows)
        & (win // ctx_len == centers[..., None] // ctx_len)
    )
    tokens = torch.where(valid, token_ids[win.clamp(0, n_rows - 1)], -1)
    lat = torch.arange(len(centers))[:, None, None].expand_as(win)[valid]
    flat, order = win[valid].sort()
    lat = lat[order]
    values = torch.zeros(len(flat))
    for i, rec in enumerate(store.records(site)):
        lo, hi = (int(torch.searchsorted(flat, b)) for b in (rec.row_start, rec.row_end))
        if lo == hi:
            continue
        uniq, inv = flat[lo:hi].unique(return_inverse=True)
        a = acts_of(store.shard(site, i)[uniq - rec.row_start])  # [U, n]
        values[order[lo:hi]] = a[inv, lat[lo:hi]]
    acts = torch.zeros(win.shape)
    acts[valid] = values
    return tokens, acts


def _directions(sae, model, site: str) -> tuple[torch.Tensor | None, str]:
    """Output direction of every latent in the residual stream, [d_sae or d, d_model], and how."""
    layer, d_model = layer_of(site), model.cfg.d_model
    if sae is not None:
        W, out_site = sae.W_dec.detach().float(), dictionary_sites(sae)[1]
        if W.shape[1] == d_model:
            return W, "W_dec @ W_U"
        if out_site.endswith("mlp.hook_post") and layer is not None:
            return W @ model.W_out[layer].detach().float(), "W_dec @ W_out[layer] @ W_U"
        return None, f"no output direction for a dictionary decoding to {out_site}"
    if site.endswith("mlp.hook_post") and layer is not None:
        return model.W_out[layer].detach().float(), "W_out[layer] @ W_U"
    if site.endswith(
        ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
    ):
        return torch.eye(d_model), "W_U rows (residual-stream basis)"
    return None, f"no output direction for neurons of {site}"


@torch.no_grad()
def _logits_and_neighbors(D: torch.Tensor | None, W_U: torch.Tensor, n: int, W_cos: torch.Tensor | None):
    out = {k: torch.full((n, N_LOGITS), -1) for k in ("top_logit_ids", "bottom_logit_ids")}
    out |= {k: torch.full((n, N_LOGITS), torch.nan) for k in ("top_logit_vals", "bottom_logit_vals")}
    if D is not None:
        for lo in range(0, n, 256):
            logits = D[lo : min(lo + 256, n)] @ W_U  # [chunk, vocab]
            out["top_logit_vals"][lo : lo + 256], out["top_logit_ids"][lo : lo + 256] = logits.topk(N_LOGITS)
            v, i = logits.topk(N_LOGITS, largest=False)
            out["bottom_logit_vals"][lo : lo + 256], out["bottom_logit_ids"][lo : lo + 256] = v, i
    out["neighbors"], out["neighbor_cos"] = (
        torch.full((n, N_NEIGHBORS), -1),
        torch.full((n, N_NEIGHBORS), torch.nan),
    )
    if W_cos is not None and len(W_cos) > 1:
        idx, cos = nearest_by_cosine(W_cos, N_NEIGHBORS)
        out["neighbors"][:, : idx.shape[1]], out["neighbor_cos"][:, : idx.shape[1]] = idx[:n], cos[:n]
    return out


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


@register("dashboards", version=1)
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
    acts_of = _Latents(sae, n, cfg.token_batch)
    token_ids = store.token_ids()
    keep = token_ids >= 0
    if cfg.skip_bos:
        keep &= torch.tensor(store.tokens().column("pos").to_numpy()) != 0
    if cfg.n_tokens > 0:
        keep &= keep.cumsum(0) <= cfg.n_tokens

    def batches(desc):
        return _batches(store, site, keep, cfg.token_batch, ctx, desc)

    top = _pass_top(batches("dashboards: top-k"), acts_of, n, cfg.n_top)
    max_act = top["top_acts"][:, 0].clone()
    counts, q_acts, q_rows, q_counts = _pass_hist_quantiles(
        batches("dashboards: quantiles"), acts_of, max_act, cfg.n_quantiles, cfg.quantile_samples, cfg.seed
    )
    centers = torch.cat([top["top_rows"], q_rows], 1)
    tokens, acts = _windows(store, site, acts_of, centers, cfg.window_before, cfg.window_after, token_ids)
    D, note = _directions(sae, model, site)
    W_cos = sae.W_dec.detach() if sae is not None else D if D is not None and len(D) == width else None
    extra = _logits_and_neighbors(D, model.W_U.detach().float(), n, W_cos)
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
        **extra,
    )
