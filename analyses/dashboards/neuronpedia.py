"""Neuronpedia / SAEDashboard export of a dashboards result.

Field names follow SAEDashboard's `NeuronpediaDashboardFeature`/`Activation` dataclasses and
Neuronpedia's feature/activation tables (ecosystem.md §4.3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.analyses.dashboards.result import DashboardResult
from workbench.sites import layer_of


def to_neuronpedia(result: DashboardResult, i: int) -> dict[str, Any]:
    """Latent i as one SAEDashboard/Neuronpedia feature (field names of their dataclasses)."""
    d = result.latent(i)
    acts = []
    groups = [(-1.0, float(result.max_act[i]), -1.0, d["top"])]
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
    counts, edges = result.hist_counts[i], result.hist_edges[i]
    return {
        "modelId": result.model,
        "layer": layer_of(result.site),
        "index": i,
        "feature_index": i,
        "hookName": result.site,
        "maxActApprox": float(result.max_act[i]),
        "frac_nonzero": float(result.density[i]),
        "pos_str": [t for t, _ in d["pos_logits"]],
        "pos_values": [v for _, v in d["pos_logits"]],
        "neg_str": [t for t, _ in d["neg_logits"]],
        "neg_values": [v for _, v in d["neg_logits"]],
        "topkCosSimIndices": [j for j, _ in d["neighbors"]],
        "topkCosSimValues": [c for _, c in d["neighbors"]],
        "freq_hist_data_bar_heights": counts.tolist(),
        "freq_hist_data_bar_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "n_tokens_in_prompt": len(result.ctx_tokens[i, 0]),
        "activations": acts,
    }


def export_neuronpedia(result: DashboardResult, path: str | Path, sae_set: str = "", latents=None) -> Path:
    """Write a SAEDashboard `batch-N.json`-shaped file: {model_id, layer, sae_set, features: [...]}."""
    latents = range(result.n_latents) if latents is None else latents
    batch = {
        "model_id": result.model,
        "layer": layer_of(result.site),
        "sae_set": sae_set or ("neurons" if result.source == "neurons" else Path(result.source).name),
        "features": [to_neuronpedia(result, int(i)) for i in latents],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(batch))
    return path
