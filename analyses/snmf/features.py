"""What each SNMF feature is: its rows, its top contexts, its neurons, its vocabulary projection, its density.

Input-centric and output-centric readings of Shafran, Geiger, Geva 2025 (arXiv 2506.10920, §3):
the top entries of G[:, k] give the feature's top-activating tokens (shown with their context),
and the vocabulary projection of its output W_U · norm(W_out[layer]ᵀ F[:, k]) gives the tokens it
promotes and suppresses (here through `analyses/dashboards`' norm-folded logit code, the numbers
SAEDashboard/Neuronpedia show for SAE latents).
"""

from __future__ import annotations

import math

import torch

from workbench.analyses.dashboards.topk import UniqueTopK, window_hashes
from workbench.firing import FIRE_FRACTION

DENSITY_RULE = (
    f"an SNMF feature fires on a token when its coefficient G > {FIRE_FRACTION:g} × its largest G over "
    "the fitted tokens (workbench.firing's relative rule: the nonnegative solver leaves most coefficients "
    "small but not exactly 0, so 'G > 0' would count nearly every token); density = fraction of fitted "
    "tokens where it fires"
)


def fit_rows(store, site: str, n_tokens: int, skip_bos: bool, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(store rows [n], activations [n, d]) of the first `n_tokens` kept rows (0 = all), shard by shard.

    Kept: real tokens (id ≥ 0) and, with skip_bos, not position 0. The paper drops BOS (its
    activations are massive attention-sink outliers that would take whole features)."""
    keep = store.token_ids() >= 0
    if skip_bos:
        keep &= store.positions() != 0
    rows, parts, have = [], [], 0
    for i in progress(range(store.n_shards(site)), desc="snmf: reading rows"):
        rec = store.records(site)[i]
        mask = keep[rec.row_start : rec.row_end]
        if not mask.any():
            continue
        take = torch.arange(rec.row_start, rec.row_end)[mask]
        x = store.shard(site, i)[mask].reshape(len(take), -1).float()
        if n_tokens > 0:
            take, x = take[: n_tokens - have], x[: n_tokens - have]
        rows.append(take)
        parts.append(x)
        have += len(take)
        if n_tokens > 0 and have >= n_tokens:
            break
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, math.prod(store.shape(site)))
    return torch.cat(rows), torch.cat(parts)


@torch.no_grad()
def top_contexts(
    G: torch.Tensor,
    rows: torch.Tensor,
    token_ids: torch.Tensor,
    ctx_len: int,
    n_top: int,
    before: int,
    after: int,
) -> dict[str, torch.Tensor]:
    """Per feature its n_top largest coefficients, one per distinct token window (dashboards' UniqueTopK),
    with the window's tokens and the feature's G on each of them (0 on rows not fitted, e.g. BOS).

    Returns top_coefs, top_rows [rank, n_top] and ctx_tokens, ctx_coefs [rank, n_top, before+1+after]
    (token −1 = outside the sequence)."""
    rank = G.shape[1]
    hashes = window_hashes(token_ids, ctx_len, before, after)
    top = UniqueTopK(rank, n_top)
    for lo in range(0, len(G), 4096):
        top.add(G[lo : lo + 4096].float(), rows[lo : lo + 4096], hashes[rows[lo : lo + 4096]])
    vals, top_rows = top.result()
    n_rows = len(token_ids)
    index = torch.full((n_rows,), -1)
    index[rows] = torch.arange(len(rows))  # store row -> fitted row
    win = top_rows[..., None] + torch.arange(-before, after + 1)  # [rank, n_top, W]
    valid = (
        (top_rows[..., None] >= 0)
        & (win >= 0)
        & (win < n_rows)
        & (win // ctx_len == top_rows[..., None] // ctx_len)
    )
    at = win.clamp(0, n_rows - 1)
    tokens = torch.where(valid, token_ids[at], -1)
    fitted = index[at]
    feature = torch.arange(rank)[:, None, None].expand_as(win)
    coefs = torch.where(valid & (fitted >= 0), G[fitted.clamp(min=0), feature].float(), 0.0)
    return {
        "top_coefs": torch.where(top_rows >= 0, vals, 0.0),
        "top_rows": top_rows,
        "ctx_tokens": tokens,
        "ctx_coefs": coefs,
    }


def top_neurons(F: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rank, n] the neurons with the largest |F[:, k]| per feature, and their signed weights."""
    idx = F.abs().topk(min(n, F.shape[0]), dim=0).indices.T  # [rank, n]
    return idx, F.T.gather(1, idx)


def density(G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Firing density under DENSITY_RULE, the largest and the mean coefficient, per feature."""
    max_coef = G.max(0).values if len(G) else torch.zeros(G.shape[1])
    fired = (G > FIRE_FRACTION * max_coef).float().mean(0) if len(G) else torch.zeros(G.shape[1])
    return {"density": fired, "max_coef": max_coef.float(), "mean_coef": G.float().mean(0)}
