"""The dashboards result: tensors per latent and plain-Python views for the app (export: neuronpedia.py).

Export field names follow SAEDashboard's `NeuronpediaDashboardFeature`/`Activation` dataclasses and
Neuronpedia's feature/activation tables (ecosystem.md §4.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.analysis import Result


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
    """What the logit effect is (logits.NOTE) and which output direction it uses."""
    firing_rule: str
    """When a unit fires and what density means (workbench.firing.RULE)."""
    window_before: int
    quantile_samples: int
    density: torch.Tensor  # [n_latents] fraction of scanned tokens where the unit fires (firing_rule)
    density_neg: torch.Tensor  # [n_latents] fraction where it fires below −threshold (0 if non-negative)
    fire_threshold: torch.Tensor  # [n_latents] t on |a|: 0 for non-negative units
    max_act: torch.Tensor  # [n_latents] largest activation, >= 0
    min_act: torch.Tensor  # [n_latents] smallest activation, <= 0; < 0 marks a signed unit
    mean_act: torch.Tensor  # [n_latents] mean |activation| over the tokens where the unit fires
    top_acts: torch.Tensor  # [n_latents, n_top] largest positive activations, one per token window
    top_rows: torch.Tensor  # [n_latents, n_top] store row of the activating token, -1 = none
    ctx_tokens: torch.Tensor  # [n_latents, n_top, window] token ids, -1 = padding
    ctx_acts: torch.Tensor  # [n_latents, n_top, window]
    neg_acts: torch.Tensor  # [n_latents, n_top] most negative activations, one per window (0 = none)
    neg_rows: torch.Tensor  # [n_latents, n_top] their store rows, -1 = none
    neg_ctx_tokens: torch.Tensor  # [n_latents, n_top, window]
    neg_ctx_acts: torch.Tensor
    quantile_acts: torch.Tensor  # [n_latents, n_quantiles * samples], interval-major
    quantile_rows: torch.Tensor
    quantile_counts: torch.Tensor  # [n_latents, n_quantiles] firing tokens per interval of [min, max]
    quantile_ctx_tokens: torch.Tensor
    quantile_ctx_acts: torch.Tensor
    top_logit_ids: torch.Tensor  # [n_latents, 10], -1 when the site has no output direction
    top_logit_vals: torch.Tensor
    bottom_logit_ids: torch.Tensor
    bottom_logit_vals: torch.Tensor
    neighbors: torch.Tensor  # [n_latents, 8] by decoder (or W_out) cosine, -1 = none
    neighbor_cos: torch.Tensor
    corr_neighbors: torch.Tensor  # [n_latents, 8] by activation correlation over the tokens, -1 = none
    corr_values: torch.Tensor  # Pearson r
    hist_counts: torch.Tensor  # [n_latents, 32] firing tokens (non-negative) or all tokens (signed)
    hist_edges: torch.Tensor  # [n_latents, 33] from min(0, min_act) to max_act

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
        """Everything about unit i as plain Python: firing numbers, top positive and (for signed
        units) top negative contexts, quantile samples, logits, neighbours, histogram."""
        if not 0 <= i < self.n_latents:
            raise IndexError(f"latent {i} out of range: this result has {self.n_latents} latents")
        s, lo, hi = self.quantile_samples, float(self.min_act[i]), float(self.max_act[i])
        n_q = self.quantile_acts.shape[1] // max(s, 1)
        quantiles = []
        for q in range(n_q):
            sl = slice(q * s, (q + 1) * s)
            ctxs = self._contexts(
                self.quantile_ctx_tokens[i, sl], self.quantile_ctx_acts[i, sl], self.quantile_acts[i, sl]
            )
            frac = float(self.quantile_counts[i, q] / self.quantile_counts[i].sum().clamp(min=1))
            b_lo, b_hi = lo + q * (hi - lo) / n_q, lo + (q + 1) * (hi - lo) / n_q
            quantiles.append({"bin_min": b_lo, "bin_max": b_hi, "bin_contains": frac, "contexts": ctxs})
        return {
            "latent": i,
            "signed": lo < 0,
            "density": float(self.density[i]),
            "density_neg": float(self.density_neg[i]),
            "fire_threshold": float(self.fire_threshold[i]),
            "max_act": hi,
            "min_act": lo,
            "mean_act": float(self.mean_act[i]),
            "top": self._contexts(self.ctx_tokens[i], self.ctx_acts[i], self.top_acts[i]),
            "negative": self._contexts(self.neg_ctx_tokens[i], self.neg_ctx_acts[i], self.neg_acts[i]),
            "quantiles": quantiles,
            "pos_logits": self._logits(self.top_logit_ids[i], self.top_logit_vals[i]),
            "neg_logits": self._logits(self.bottom_logit_ids[i], self.bottom_logit_vals[i]),
            "neighbors": [
                (int(j), float(c)) for j, c in zip(self.neighbors[i], self.neighbor_cos[i]) if j >= 0
            ],
            "correlated": [
                (int(j), float(r)) for j, r in zip(self.corr_neighbors[i], self.corr_values[i]) if j >= 0
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
                    "min_act": float(self.min_act[i]),
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
                "frac_signed": float((self.min_act < 0).float().mean()),
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

    def export(self, path: str | Path, **options) -> Path:
        """`workbench export KEY PATH`: SAEDashboard `batch-N.json` files of every latent (neuronpedia.py)."""
        from workbench.analyses.dashboards.neuronpedia import export_neuronpedia

        return export_neuronpedia(self, path, **options)
