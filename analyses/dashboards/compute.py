"""Streaming computation of dashboard data: three passes over the store, bounded by one shard × latents."""

from __future__ import annotations

import torch

from workbench.analyses.dashboards.logits import folded_unembed, logit_effects
from workbench.analyses.dashboards.topk import UniqueTopK
from workbench.analyses.sae_eval import dictionary_sites
from workbench.context import Context
from workbench.firing import fire_threshold, fires, is_signed
from workbench.sae.metrics import nearest_by_cosine
from workbench.sites import layer_of

N_BINS, N_LOGITS, N_NEIGHBORS = 32, 10, 8
MAX_CORRELATED = 8192  # co-activation needs an [n, n] float64 matrix: 0.5 GB at this size


class Latents:
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


def store_batches(store, site: str, keep: torch.Tensor, token_batch: int, ctx: Context, desc: str):
    """(rows [B], x [B, ...]) over the kept rows, shard by shard."""
    for i in ctx.progress(range(store.n_shards(site)), desc=desc):
        rec = store.records(site)[i]
        mask = keep[rec.row_start : rec.row_end]
        if not mask.any():
            continue
        rows, x = torch.arange(rec.row_start, rec.row_end)[mask], store.shard(site, i)[mask]
        for lo in range(0, len(x), token_batch):
            yield rows[lo : lo + token_batch], x[lo : lo + token_batch]


def merge_topk(vals, rows, cand_vals, cand_rows, k: int, extra=None):
    """Running top-k per latent: topk over the kept [L, k] and the new candidates [L, B]."""
    all_v = torch.cat([vals, cand_vals], 1)
    v, idx = all_v.topk(k, dim=1)
    r = torch.cat([rows, cand_rows.expand(len(vals), -1)], 1).gather(1, idx)
    return v, r, (None if extra is None else torch.cat(extra, 1).gather(1, idx))


class CoActivation:
    """Pearson correlation between latents' activations over the scanned tokens, batch by batch."""

    def __init__(self, n: int):
        self.enabled = 1 < n <= MAX_CORRELATED
        m = n if self.enabled else 0
        self.sum, self.gram, self.count = (
            torch.zeros(m, dtype=torch.float64),
            torch.zeros(m, m, dtype=torch.float64),
            0,
        )

    def add(self, a: torch.Tensor) -> None:  # a: [B, n]
        if self.enabled:
            self.sum += a.sum(0).double()
            self.gram += (a.T @ a).double()  # fp32 matmul per batch, fp64 running sum
            self.count += len(a)

    def nearest(self, n: int, k: int = N_NEIGHBORS) -> dict[str, torch.Tensor]:
        """Top-k most correlated other latents, [n, k] ids (-1 = none: dead or constant) and r."""
        ids, r = torch.full((n, k), -1), torch.full((n, k), torch.nan)
        if self.enabled and self.count > 1:
            mean = self.sum / self.count
            cov = self.gram / self.count - torch.outer(mean, mean)
            std = cov.diagonal().clamp(min=0).sqrt()
            corr = cov / torch.outer(std, std)
            corr[~torch.isfinite(corr)] = -torch.inf  # dead or constant latents: 0/0 or x/0
            corr.fill_diagonal_(-torch.inf)
            v, i = corr.topk(min(k, n - 1), dim=1)
            ok = torch.isfinite(v)
            ids[:, : i.shape[1]] = torch.where(ok, i, -1)
            r[:, : v.shape[1]] = torch.where(ok, v, torch.nan).float()
        return {"corr_neighbors": ids, "corr_values": r}


def pass_top(batches, acts_of, n: int, n_top: int, hashes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Range, top positive and top negative examples (one per token window) and co-activation sums.

    hashes: [rows] window hash of every store row (topk.window_hashes)."""
    pos, neg = UniqueTopK(n, n_top), UniqueTopK(n, n_top)
    lo, hi, count = torch.full((n,), torch.inf), torch.full((n,), -torch.inf), 0
    co = CoActivation(n)
    for r, x in batches:
        a = acts_of(x)  # [B, n]
        lo, hi = torch.minimum(lo, a.min(0).values), torch.maximum(hi, a.max(0).values)
        count += len(a)
        co.add(a)
        h = hashes[r]
        pos.add(torch.where(a > 0, a, -torch.inf), r, h)
        if (a < 0).any():  # never for dictionary latents
            neg.add(torch.where(a < 0, -a, -torch.inf), r, h)
    top_acts, top_rows = pos.result()
    neg_acts, neg_rows = neg.result()
    seen = count > 0
    return {
        "top_acts": top_acts.clamp(min=0),
        "top_rows": top_rows,
        "neg_acts": (-neg_acts).clamp(max=0),
        "neg_rows": neg_rows,
        "min_act": lo if seen else torch.zeros(n),
        "max_act": hi if seen else torch.zeros(n),
        "count": torch.tensor(count),
        **co.nearest(n),
    }


def pass_hist_quantiles(batches, acts_of, lo, hi, n_q: int, s: int, seed: int):
    """Firing statistics (workbench.firing), histogram and quantile samples per unit.

    lo, hi: [n] the unit's range ([0, max] for non-negative units, [min, max] for signed ones).
    Density = fraction of tokens where the unit fires, density_neg where it fires below −t;
    mean_act = mean |a| over firing tokens. The histogram counts firing tokens of non-negative
    units and every token of signed units on [lo, hi]; quantile samples: s random firing tokens
    from each of n_q equal intervals of [lo, hi] (random-key top-k).
    """
    n = len(hi)
    t = fire_threshold(lo, hi)
    signed = is_signed(lo)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n * N_BINS, dtype=torch.long)
    q_counts = torch.zeros(n * n_q, dtype=torch.long)
    keys, rows, vals = (
        torch.full((n, n_q, s), -torch.inf),
        torch.full((n, n_q, s), -1),
        torch.zeros(n, n_q, s),
    )
    fired, fired_neg, abs_sum = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    count = 0
    width = torch.where(hi > lo, hi - lo, 1.0)
    for r, x in batches:
        a = acts_of(x)
        on = fires(a, t)
        count += len(a)
        fired += on.sum(0)
        fired_neg += (on & (a < 0)).sum(0)
        abs_sum += torch.where(on, a.abs(), 0).sum(0).double()
        u = (a - lo) / width  # position in [lo, hi] as a fraction
        counts += torch.bincount(
            (torch.arange(n) * N_BINS + (u * N_BINS).long().clamp(0, N_BINS - 1))[on | signed],
            minlength=n * N_BINS,
        )
        interval = ((u * n_q).ceil().long() - 1).clamp(0, n_q - 1)
        q_counts += torch.bincount((torch.arange(n) * n_q + interval)[on], minlength=n * n_q)
        key = torch.rand(a.shape, generator=gen)
        for q in range(n_q):
            cand = torch.where(on & (interval == q), key, -torch.inf).T
            keys[:, q], rows[:, q], vals[:, q] = merge_topk(
                keys[:, q], rows[:, q], cand, r[None], s, (vals[:, q], a.T)
            )
    rows[keys == -torch.inf] = -1
    vals[keys == -torch.inf] = 0
    return {
        "density": (fired / max(count, 1)).float(),
        "density_neg": (fired_neg / max(count, 1)).float(),
        "mean_act": (abs_sum / fired.clamp(min=1)).float(),
        "fire_threshold": t,
        "hist_counts": counts.reshape(n, N_BINS),
        "hist_edges": lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, N_BINS + 1)[None],
        "quantile_acts": vals.reshape(n, -1),
        "quantile_rows": rows.reshape(n, -1),
        "quantile_counts": q_counts.reshape(n, n_q),
    }


@torch.no_grad()
def windows(
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


def directions(sae, model, site: str) -> tuple[torch.Tensor | None, str]:
    """Output direction of every latent in the residual stream, [d_sae or d, d_model], and how."""
    layer, d_model = layer_of(site), model.cfg.d_model
    if sae is not None:
        W, out_site = sae.W_dec.detach().float(), dictionary_sites(sae)[1]
        # hook_z before the width test: n_heads * d_head can equal d_model (smollm2: 9 x 64 = 576)
        if out_site.endswith("attn.hook_z") and layer is not None:
            return W.reshape(len(W), -1) @ _w_o(model, layer), "W_dec @ W_O[layer] @ W_U"
        if W.shape[1] == d_model:
            return W, "W_dec @ W_U"
        if out_site.endswith("mlp.hook_post") and layer is not None:
            return W @ model.W_out[layer].detach().float(), "W_dec @ W_out[layer] @ W_U"
        return None, f"no output direction for a dictionary decoding to {out_site}"
    if site.endswith("mlp.hook_post") and layer is not None:
        return model.W_out[layer].detach().float(), "W_out[layer] @ W_U"
    if site.endswith("attn.hook_z") and layer is not None:
        return _w_o(model, layer), "W_O[layer] @ W_U (one row per head dimension)"
    if site.endswith(
        ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
    ):
        return torch.eye(d_model), "W_U rows (residual-stream basis)"
    return None, f"no output direction for neurons of {site}"


def _w_o(model, layer: int) -> torch.Tensor:
    """W_O of one layer as [n_heads * d_head, d_model]: what a flattened hook_z row writes."""
    W_O = model.W_O[layer].detach().float()  # [n_heads, d_head, d_model]
    return W_O.reshape(-1, W_O.shape[-1])


@torch.no_grad()
def logits_and_neighbors(D: torch.Tensor | None, model, n: int, W_cos: torch.Tensor | None):
    """Top/bottom N_LOGITS logit effects of the first n directions (logits.logit_effects) and the
    N_NEIGHBORS nearest rows of W_cos by cosine."""
    out = {k: torch.full((n, N_LOGITS), -1) for k in ("top_logit_ids", "bottom_logit_ids")}
    out |= {k: torch.full((n, N_LOGITS), torch.nan) for k in ("top_logit_vals", "bottom_logit_vals")}
    if D is not None:
        W_U, centre = folded_unembed(model)
        for lo in range(0, n, 256):
            logits = logit_effects(D[lo : min(lo + 256, n)], W_U, centre)  # [chunk, vocab]
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
