"""The default training recipe's pieces, apart from the loop: input scaling, b_dec initialisation,
the dead-latent window rule, the passes warning, and scoring a saved dictionary on a split.

Why (data/sae_notes.md, issue 13): with SAELens' defaults (b_dec = 0, a fixed 250k-token window)
61 % of a 4,608-latent TopK SAE's latents never fired after one pass over 1M smollm2 tokens;
starting b_dec at the data's centre alone took that to 0 %.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from workbench.sae import metrics as M
from workbench.sae.data import mean_norm, sample_rows
from workbench.sae.io import load_dictionary
from workbench.sae.rows import Rows, center, first_span
from workbench.store import ActivationStore


def input_scaling(store: ActivationStore, sites: list[str], rows: Rows) -> list[float]:
    """√d / E‖x‖ per site over the training rows (SAELens' expected_average_only_in)."""
    out = []
    for site in sites:
        d = math.prod(store.shape(site))
        norms = rows.norms.get(site)
        mean = (
            float(norms[rows.keep].double().mean())
            if norms is not None
            else mean_norm(store, site, rows.keep)
        )
        out.append(math.sqrt(d) / mean)
    return out


@torch.no_grad()
def init_b_dec(sae, store: ActivationStore, site: str, keep: Tensor, scale: float, method: str) -> None:
    """b_dec ← the centre (geometric median or mean) of `site`'s training rows, in training units;
    'zeros' keeps SAELens' initialisation. `site` is the reconstruction target (a transcoder's output)."""
    if method == "zeros":
        return
    if method not in ("mean", "geometric_median"):
        raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, not '{method}'")
    sae.b_dec.data.copy_(center(store, site, keep, scale, method).to(sae.b_dec.dtype))


def dead_window_tokens(cap_tokens: int, frac: float, run_tokens: int, batch_size: int) -> int:
    """min(cap, frac × run tokens), at least one batch: AuxK needs dead latents well before the end."""
    scaled = int(frac * run_tokens) if frac > 0 else cap_tokens
    return max(batch_size, min(cap_tokens, scaled))


def passes_warning(run_tokens: int, train_rows: int, many: float, epoch_tokens: int) -> str | None:
    """One line when a run makes less than one pass, or more than `many`, over its training rows.
    `epoch_tokens` is what one pass of whole batches covers (the stream drops each buffer's partial
    batch): a run of at least that many tokens is one pass, not "part of the store never seen"."""
    passes = run_tokens / max(train_rows, 1)
    if run_tokens < epoch_tokens:
        return (
            f"train-sae: {run_tokens:,} training tokens are {passes:.2f} passes over the store's {train_rows:,} "
            "training rows: part of the store is never seen; raise --n-tokens or use a smaller store"
        )
    if passes > many:
        return (
            f"train-sae: {run_tokens:,} training tokens are {passes:.0f} passes over the store's {train_rows:,} "
            "training rows: the dictionary may memorise them; capture more tokens"
        )
    return None


@torch.no_grad()
def score(folder: str, store: ActivationStore, sites: list[str], rows: Rows, n_rows: int) -> dict:
    """L0, FVU on ordinary tokens and on all tokens but BOS (same span of text), MSE and never-fired
    latents of the saved dictionary (reloaded from disk) on the first `n_rows` ordinary rows of a split."""
    sae = load_dictionary(folder)
    ordinary, everything = first_span(rows, n_rows)
    out: dict = {"split": rows.split}
    for name, mask in (("ordinary", ordinary), ("all", everything)):
        cols = sample_rows(store, sites, int(mask.sum()), mask)
        x, y = cols[0], cols[-1]
        stats = M.ReconstructionStats(y.shape[-1] if len(y) else 1, sae.cfg.d_sae)
        for lo in range(0, len(x), 4096):
            f = sae.encode(x[lo : lo + 4096])
            stats.add(y[lo : lo + 4096], sae.decode(f), f)
        if name == "ordinary":
            out |= {"n_tokens": stats.n, "l0": stats.l0(), "fvu": stats.fvu(), "mse": stats.mse()}
            out |= {
                "explained_variance": stats.explained_variance(),
                "frac_never_fired": float((stats.fires == 0).float().mean()),
            }
        else:
            out |= {"n_tokens_all_but_bos": stats.n, "fvu_all_but_bos": stats.fvu()}
    excluded = int(everything.sum()) - int(ordinary.sum())
    out["excluded_in_span"] = excluded  # special tokens and outliers among the scored span
    return out
