"""Neuronpedia export of a dashboards result, in SAEDashboard's own `batch-N.json` format.

    workbench export KEY out/ --model-id smollm2-135m --source-set res-wb
    -> out/batch-0.json, out/batch-1.json, ... (FEATURES_PER_BATCH features each)

Each file is a `NeuronpediaDashboardBatch` ({model_id, layer, sae_set, sae_id_suffix, features});
each feature has exactly the keys of SAEDashboard's `NeuronpediaDashboardFeature.to_dict()` and
each activation those of `NeuronpediaDashboardActivation.to_dict()` — their constructors take
`**json` and reject any other key — so `sae_dashboard.neuronpedia.neuronpedia_export` (the
converter to Neuronpedia's upload layout) reads the folder as it reads SAEDashboard's own output.

What each field holds here (SAEDashboard's meaning, computed from the result and the weights):
- activations: the top contexts (bin_min = -1, bin_max = max, bin_contains = -1, as SAEDashboard's
  "TOP ACTIVATIONS" group) then the quantile samples; `qualifying_token_index` is the index of the
  token the example was chosen for. Top negative contexts of signed units have no Neuronpedia
  field and are not exported.
- correlated_features_*: the Pearson r by activation the dashboards computed (`corr_neighbors`);
  for neuron dashboards the units are neurons, so they are also `correlated_neurons_*`. The `_l1`
  lists (SAEDashboard: uncentred cosine of activations) are not computed by the dashboards: empty.
- neuron_alignment_*: the N_ALIGN largest entries of the unit's decoder row (its output direction
  in the site's basis), and |value| / ‖row‖₁ (SAEDashboard's `add_neuron_alignment_data`).
- logits_hist_data_bar_*: histogram (LOGIT_BINS bins) of the unit's logit effect over the whole
  vocabulary, the same effect as the top ± logits (logits.NOTE).
- decoder_weights_dist: per-head share of the decoder row's norm, for `attn.hook_z` dictionaries.
The weight-derived fields need the model (and the dictionary); when either cannot be loaded they
are left empty with one warning, and everything else is still written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from workbench.analyses.dashboards.result import DashboardResult
from workbench.sites import layer_of

log = logging.getLogger(__name__)
FEATURES_PER_BATCH = 128  # SAEDashboard's n_features_at_a_time default
N_ALIGN = 3  # rows of SAEDashboard's feature tables (n_rows default)
LOGIT_BINS = 40  # SAEDashboard's logits histogram bins
DECIMALS = 5  # SAEDashboard rounds every list to 5 decimals (FeatureProcessor.round_list)


class ExportError(ValueError):
    """An export path or option that cannot be used; one readable line."""


def _round(values) -> list[float]:
    return [round(float(v), DECIMALS) for v in values]


def _activations(result: DashboardResult, i: int) -> list[dict[str, Any]]:
    d = result.latent(i)
    groups = [(-1.0, d["max_act"], -1.0, d["top"])]
    groups += [(q["bin_min"], q["bin_max"], q["bin_contains"], q["contexts"]) for q in d["quantiles"]]
    return [
        {
            "bin_min": float(lo),
            "bin_max": float(hi),
            "bin_contains": float(contains),
            "tokens": c["tokens"],
            "values": _round(c["acts"]),
            "qualifying_token_index": int(c["max_index"]),
        }
        for lo, hi, contains, ctxs in groups
        for c in ctxs
    ]


def _pairs(ids: torch.Tensor, values: torch.Tensor) -> tuple[list[int], list[float]]:
    keep = ids >= 0
    return [int(j) for j in ids[keep]], _round(values[keep])


def to_neuronpedia(result: DashboardResult, i: int, tables: dict[str, list] | None = None) -> dict[str, Any]:
    """Unit i as one SAEDashboard `NeuronpediaDashboardFeature` dict (exactly its `to_dict()` keys)."""
    tables = tables or {}
    d = result.latent(i)
    corr_ids, corr_r = _pairs(result.corr_neighbors[i], result.corr_values[i])
    neurons = result.source == "neurons"
    counts, edges = result.hist_counts[i], result.hist_edges[i]
    width = len(result.ctx_tokens[i, 0])
    return {
        "feature_index": i,
        "neuron_alignment_indices": tables.get("align_ids", {}).get(i, []),
        "neuron_alignment_values": tables.get("align_values", {}).get(i, []),
        "neuron_alignment_l1": tables.get("align_l1", {}).get(i, []),
        "correlated_neurons_indices": corr_ids if neurons else [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": corr_r if neurons else [],
        "correlated_features_indices": corr_ids,
        "correlated_features_l1": [],
        "correlated_features_pearson": corr_r,
        "neg_str": [t for t, _ in d["neg_logits"]],
        "neg_values": _round(v for _, v in d["neg_logits"]),
        "pos_str": [t for t, _ in d["pos_logits"]],
        "pos_values": _round(v for _, v in d["pos_logits"]),
        "frac_nonzero": float(result.density[i]),
        "freq_hist_data_bar_values": _round((edges[:-1] + edges[1:]) / 2),
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "logits_hist_data_bar_heights": tables.get("logit_heights", {}).get(i, []),
        "logits_hist_data_bar_values": tables.get("logit_values", {}).get(i, []),
        "n_prompts_total": 0,  # the dashboards scan store rows, not prompts: n_tokens is their count
        "n_tokens_in_prompt": width,  # tokens of each exported context window
        "dataset": "",
        "activations": _activations(result, i),
        "decoder_weights_dist": tables.get("head_dist", {}).get(i, []),
        "vector": [],
    }


def _batches(latents: list[int], size: int) -> list[list[int]]:
    return [latents[lo : lo + size] for lo in range(0, len(latents), size)]


def check_out_folder(path: Path) -> None:
    """Refuse a file or a non-empty folder: the export never overwrites or mixes with other files."""
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path} is a file; the Neuronpedia export writes a folder of batch-N.json files")
    if path.is_dir() and any(path.iterdir()):
        raise ExportError(f"{path} is not empty; export into a new or empty folder")


def export_neuronpedia(
    result: DashboardResult,
    path: str | Path,
    model_id: str = "",
    source_set: str = "",
    latents=None,
    features_per_batch: int = FEATURES_PER_BATCH,
    weights: bool = True,
) -> Path:
    """Write SAEDashboard-format `batch-N.json` files into folder `path`; returns the folder.

    model_id: Neuronpedia model id (default: the result's model key); source_set: Neuronpedia
    source-set name (default: 'neurons', or the dictionary folder's name). `weights=False` skips
    the weight-derived tables (neuron alignment, logits histogram, head distribution)."""
    path = Path(path).expanduser()
    check_out_folder(path)
    latents = list(range(result.n_latents)) if latents is None else [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < result.n_latents]
    if bad:
        raise ExportError(f"latent {bad[0]} out of range: this result has {result.n_latents} latents")
    tables = weight_tables(result, latents) if weights else {}
    header = {
        "model_id": model_id or Path(result.model).name,
        "layer": layer_of(result.site) or 0,
        "sae_set": source_set or ("neurons" if result.source == "neurons" else Path(result.source).name),
        "sae_id_suffix": None,
    }
    path.mkdir(parents=True, exist_ok=True)
    for n, chunk in enumerate(_batches(latents, max(1, features_per_batch))):
        batch = header | {"features": [to_neuronpedia(result, i, tables) for i in chunk]}
        tmp = path / f".batch-{n}.json.tmp"
        tmp.write_text(json.dumps(batch))
        tmp.replace(path / f"batch-{n}.json")
    return path


def weight_tables(result: DashboardResult, latents: list[int]) -> dict[str, dict[int, list]]:
    """Neuron alignment, logits histogram and head distribution per latent, from the weights."""
    from workbench.context import Context

    try:
        from workbench.analyses.dashboards.compute import directions
        from workbench.analyses.sae_eval import load_dictionary

        sae = None if result.source == "neurons" else load_dictionary(result.source)
        model = Context(show_bars=False).model(result.model, "raw")
        D, _ = directions(sae, model, result.site)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        log.warning("Neuronpedia export without neuron alignment and logits histograms: %s", err)
        return {}
    rows = sae.W_dec.detach().float() if sae is not None else None
    out: dict[str, dict[int, list]] = {}
    if rows is not None:
        out |= _alignment(rows, latents)
        if result.site.endswith("attn.hook_z"):
            out["head_dist"] = _head_dist(rows, model.cfg.n_heads, latents)
    elif D is not None:  # a neuron is its own basis vector of the site
        one = {i: [1.0] for i in latents}
        out |= {"align_ids": {i: [i] for i in latents}, "align_values": one, "align_l1": one}
    if D is not None:
        out |= _logit_hists(D, model, latents)
    return out


def _alignment(rows: torch.Tensor, latents: list[int]) -> dict[str, dict[int, list]]:
    """SAEDashboard's add_neuron_alignment_data: top N_ALIGN entries of each decoder row."""
    sel = rows[latents]
    vals, ids = sel.topk(min(N_ALIGN, sel.shape[1]), dim=1)
    l1 = vals.abs() / sel.abs().sum(1, keepdim=True).clamp(min=1e-12)
    return {
        "align_ids": {i: ids[n].tolist() for n, i in enumerate(latents)},
        "align_values": {i: _round(vals[n]) for n, i in enumerate(latents)},
        "align_l1": {i: _round(l1[n]) for n, i in enumerate(latents)},
    }


def _head_dist(rows: torch.Tensor, n_heads: int, latents: list[int]) -> dict[int, list]:
    """SAEDashboard's get_decoder_weights_distribution: per-head norm of the row / their sum."""
    norms = rows[latents].reshape(len(latents), n_heads, -1).norm(dim=-1)
    share = norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)
    return {i: _round(share[n]) for n, i in enumerate(latents)}


def _logit_hists(D: torch.Tensor, model, latents: list[int]) -> dict[str, dict[int, list]]:
    """LOGIT_BINS-bin histogram of each latent's logit effect over the vocabulary (bar centres, counts)."""
    from workbench.analyses.dashboards.logits import folded_unembed, logit_effects

    W_U, centre = folded_unembed(model)
    heights, values = {}, {}
    for lo in range(0, len(latents), 256):
        chunk = latents[lo : lo + 256]
        effects = logit_effects(D[chunk], W_U, centre).cpu()  # [chunk, vocab]
        for n, i in enumerate(chunk):
            row = effects[n]
            lo_v, hi_v = float(row.min()), float(row.max())
            hi_v = hi_v if hi_v > lo_v else lo_v + 1e-6
            counts = torch.histc(row, bins=LOGIT_BINS, min=lo_v, max=hi_v)
            step = (hi_v - lo_v) / LOGIT_BINS
            heights[i] = [float(c) for c in counts]
            values[i] = _round(lo_v + step * (b + 0.5) for b in range(LOGIT_BINS))
    return {"logit_heights": heights, "logit_values": values}
