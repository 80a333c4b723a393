"""Splicing a dictionary into the forward pass: CE loss recovered and KL (SAELens' `get_recons_loss`
semantics), with special tokens and norm-outlier rows keeping their own activation.

The output site is replaced by the dictionary's reconstruction of the input site (the same site for
SAEs; `mlp.hook_in` -> `hook_mlp_out` for transcoders, whose spliced CE is the replacement loss);
the zero-ablation baseline zeroes the output site at every position, as SAELens does.
"""

from __future__ import annotations

import torch

from workbench.sae import metrics as M
from workbench.sae.rows import Rows


def _replacement_hooks(sae, hook_in: str, hook_out: str, keep_own: torch.Tensor, limits: dict, count: dict):
    """Hooks that replace the output site by the dictionary's reconstruction of the input site, except at
    `keep_own` [batch, pos] positions (special tokens) and rows over a site's norm limit (outliers)."""
    saved: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        saved["x"] = act
        return act

    def replace(act, hook):
        x = saved.get("x", act)
        new = sae.decode(sae.encode(x.float().flatten(2))).reshape(act.shape).to(act.dtype)
        own = keep_own.clone()
        for site, t in ((hook_in, x), (hook_out, act)):
            if site in limits:
                own |= t.float().flatten(2).norm(dim=-1) > limits[site]
        count["outliers"] += int((own & ~keep_own).sum())
        return torch.where(own.reshape(*own.shape, *[1] * (act.ndim - 2)), act, new)

    return [(hook_out, replace)] if hook_in == hook_out else [(hook_in, grab), (hook_out, replace)]


@torch.no_grad()
def splice_metrics(
    model,
    sae,
    tokens: torch.Tensor,
    hook_in: str,
    hook_out: str,
    batch_size: int,
    special: torch.Tensor,
    limits: dict,
):
    """CE (clean, spliced, zero-ablated) and KL (spliced, ablated) averaged over next-token predictions.

    tokens, special: [n_seq, pos]. Losses are per prediction [n_seq, pos-1]; KL per position [n_seq, pos];
    predictions made at special positions are left out, as SAELens does (exclude_special_tokens).
    """
    sums = dict.fromkeys(["ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl"], 0.0)
    n_ce = n_kl = 0
    count = {"outliers": 0}
    zero = [(hook_out, lambda act, hook: torch.zeros_like(act))]
    for lo in range(0, len(tokens), batch_size):
        batch, own = tokens[lo : lo + batch_size], special[lo : lo + batch_size]
        clean_logits, ce_clean = model(batch, return_type="both", loss_per_token=True)
        kw = {"return_type": "both", "loss_per_token": True}
        hooks = _replacement_hooks(sae, hook_in, hook_out, own, limits, count)
        sae_logits, ce_sae = model.run_with_hooks(batch, fwd_hooks=hooks, **kw)
        abl_logits, ce_abl = model.run_with_hooks(batch, fwd_hooks=zero, **kw)
        kl_sae, kl_abl = M.kl_per_token(clean_logits, sae_logits), M.kl_per_token(clean_logits, abl_logits)
        ce_mask, kl_mask = ~own[:, :-1], ~own
        for name, v in (("ce_clean", ce_clean), ("ce_sae", ce_sae), ("ce_abl", ce_abl)):
            sums[name] += float(v[ce_mask].double().sum())
        for name, v in (("kl_sae", kl_sae), ("kl_abl", kl_abl)):
            sums[name] += float(v[kl_mask].double().sum())
        n_ce += int(ce_mask.sum())
        n_kl += int(kl_mask.sum())
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
        "splice_n_seqs": len(tokens),
        "splice_outliers_kept": count["outliers"],
    }


def splice_inputs(
    store, rows: Rows, n_seqs: int, special_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, special) [n, ctx] of the first n_seqs sequences of the split; special marks BOS/special ids."""
    ctx_len = store.config["ctx_len"]
    seq = torch.from_numpy(store.tokens().column("seq").to_numpy().astype("int64"))
    seqs = seq[rows.all_but_bos].unique()[:n_seqs]
    tokens = store.token_ids().reshape(-1, ctx_len)[seqs]
    special = torch.isin(tokens, torch.tensor(special_ids, dtype=tokens.dtype))
    if store.config.get("bos", "prepend") == "prepend" and special_ids:
        special[:, 0] = True
    return tokens, special
