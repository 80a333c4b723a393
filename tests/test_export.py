"""Neuronpedia export: the batch-N.json folder has exactly the keys and types of SAEDashboard's
`NeuronpediaDashboardBatch`/`Feature`/`Activation` (their constructors take **json and reject any
other key; mirrored here without importing sae-dashboard), and each field holds what SAEDashboard
means by it: the activating token's index, the dashboards' correlations, decoder-row alignment,
the logit-effect histogram over the vocabulary; CLI options and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from workbench import api
from workbench.analyses.dashboards.neuronpedia import LOGIT_BINS, ExportError, export_neuronpedia
from workbench.sae.archs import ArchSpec, build
from workbench.sae.io import load_dictionary, save_dictionary

MLP, RESID = "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"
OPTS = {"n_top": 4, "window_before": 5, "window_after": 2, "token_batch": 64}

# SAEDashboard 0.8 sae_dashboard/neuronpedia/neuronpedia_dashboard.py, to_dict() keys and value types
BATCH = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": type(None), "features": list}
INTS, FLOATS, STRS = "ints", "floats", "strs"
FEATURE = {
    "feature_index": int,
    "neuron_alignment_indices": INTS,
    "neuron_alignment_values": FLOATS,
    "neuron_alignment_l1": FLOATS,
    "correlated_neurons_indices": INTS,
    "correlated_neurons_l1": FLOATS,
    "correlated_neurons_pearson": FLOATS,
    "correlated_features_indices": INTS,
    "correlated_features_l1": FLOATS,
    "correlated_features_pearson": FLOATS,
    "neg_str": STRS,
    "neg_values": FLOATS,
    "pos_str": STRS,
    "pos_values": FLOATS,
    "frac_nonzero": float,
    "freq_hist_data_bar_values": FLOATS,
    "freq_hist_data_bar_heights": FLOATS,
    "logits_hist_data_bar_heights": FLOATS,
    "logits_hist_data_bar_values": FLOATS,
    "n_prompts_total": int,
    "n_tokens_in_prompt": int,
    "dataset": str,
    "activations": list,
    "decoder_weights_dist": FLOATS,
    "vector": FLOATS,
}
ACTIVATION = {
    "bin_min": float,
    "bin_max": float,
    "bin_contains": float,
    "tokens": STRS,
    "values": FLOATS,
    "qualifying_token_index": int,
}
ELEMENT = {INTS: int, FLOATS: float, STRS: str}


def _check(obj: dict, schema: dict, where: str) -> None:
    assert set(obj) == set(schema), (
        f"{where}: extra {set(obj) - set(schema)}, missing {set(schema) - set(obj)}"
    )
    for key, kind in schema.items():
        value = obj[key]
        if kind in ELEMENT:
            assert isinstance(value, list) and all(type(v) is ELEMENT[kind] for v in value), (
                where,
                key,
                value,
            )
        else:
            assert type(value) is kind, (where, key, type(value))


@pytest.fixture(scope="module")
def store(tiny_model, wikitext, tmp_path_factory):
    from workbench.capture import CaptureConfig, capture
    from workbench.context import POOL

    POOL.put(tiny_model)
    cfg = CaptureConfig(
        model=tiny_model.workbench.key, sites=(MLP, RESID), data=wikitext, n_tokens=12 * 32, ctx_len=32
    )
    return capture(cfg, model=tiny_model, out=tmp_path_factory.mktemp("store"), progress=False)


@pytest.fixture(scope="module")
def neurons(store):
    return api.run("dashboards", store=str(store.root), site=MLP, latents=6, **OPTS)


@pytest.fixture(scope="module")
def latents(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dic") / "topk"
    sae = build(ArchSpec("topk", 64, 32, k=4), {"hook_name": RESID}, seed=3)
    path = str(save_dictionary(sae, folder))  # saving folds the decoder norm: compare with what loads
    return api.run("dashboards", store=str(store.root), dictionary=path, latents=5, **OPTS), load_dictionary(
        path
    )


def _features(folder) -> list[dict]:
    return [f for n in range(len(list(folder.iterdir()))) for f in json.loads((folder / f"batch-{n}.json").read_text())["features"]]  # fmt: skip


def test_batches_match_saedashboards_schema_and_naming(neurons, tmp_path):
    out = export_neuronpedia(
        neurons, tmp_path / "np", model_id="smol", source_set="mlp-out", features_per_batch=4
    )
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "batch-1.json"]  # 6 units, 4 per batch
    for n in range(2):
        batch = json.loads((out / f"batch-{n}.json").read_text())
        _check(batch, BATCH, f"batch {n}")
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("smol", 0, "mlp-out")
        for feature in batch["features"]:
            _check(feature, FEATURE, f"feature {feature['feature_index']}")
            assert feature["activations"], "every live unit has top contexts"
            for act in feature["activations"]:
                _check(act, ACTIVATION, f"activation of {feature['feature_index']}")
    assert [f["feature_index"] for f in _features(out)] == list(range(6))


def test_fields_hold_what_saedashboard_means(neurons, tiny_model, tmp_path):
    feats = _features(export_neuronpedia(neurons, tmp_path / "np"))
    for i, f in enumerate(feats):
        top = f["activations"][0]  # the top group: bin_min = -1, bin_max = max, as SAEDashboard's
        q = top["qualifying_token_index"]
        assert (top["bin_min"], top["bin_contains"]) == (-1.0, -1.0)
        assert top["bin_max"] == pytest.approx(float(neurons.max_act[i]))
        assert top["values"][q] == pytest.approx(float(neurons.top_acts[i, 0]), abs=1e-4)
        assert top["tokens"][q] == neurons.decoded[str(int(neurons.ctx_tokens[i, 0, OPTS["window_before"]]))]
        ids = [int(j) for j in neurons.corr_neighbors[i] if j >= 0]
        assert f["correlated_features_indices"] == f["correlated_neurons_indices"] == ids  # neurons: both
        assert f["correlated_features_pearson"] == pytest.approx(
            neurons.corr_values[i, : len(ids)].tolist(), abs=1e-5
        )
        assert f["neuron_alignment_indices"] == [i] and f["frac_nonzero"] == pytest.approx(
            float(neurons.density[i])
        )
    # logit histogram of neuron i: W_out[0, i] through the final norm's gain, minus its vocab mean
    W_U = tiny_model.W_U.detach().float() * tiny_model.ln_final.weight.detach().float()[:, None]
    effects = tiny_model.W_out[0].detach().float() @ W_U
    effects = (effects - effects.mean(-1, keepdim=True)).numpy()
    for i, f in enumerate(feats):
        counts, edges = np.histogram(effects[i], bins=LOGIT_BINS, range=(effects[i].min(), effects[i].max()))
        assert np.abs(np.array(f["logits_hist_data_bar_heights"]) - counts).max() <= 1  # bin-edge rounding
        assert sum(f["logits_hist_data_bar_heights"]) == effects.shape[1]
        assert f["logits_hist_data_bar_values"][-1] == pytest.approx((edges[-2] + edges[-1]) / 2, abs=1e-4)
        assert f["pos_values"][0] == pytest.approx(
            float(effects[i].max()), abs=1e-4
        )  # same effect as the table


def test_dictionary_alignment_is_the_decoder_rows_top_entries(latents, tmp_path):
    result, sae = latents
    feats = _features(export_neuronpedia(result, tmp_path / "np"))
    W = sae.W_dec.detach().float()
    for i, f in enumerate(feats):
        vals, ids = W[i].topk(3)
        assert f["neuron_alignment_indices"] == ids.tolist()
        assert f["neuron_alignment_values"] == pytest.approx(vals.tolist(), abs=1e-5)
        assert f["neuron_alignment_l1"] == pytest.approx((vals.abs() / W[i].abs().sum()).tolist(), abs=1e-5)
        assert f["correlated_neurons_indices"] == [] and f["decoder_weights_dist"] == []  # no hook_z
    assert json.loads((tmp_path / "np" / "batch-0.json").read_text())["sae_set"] == "topk"


def test_without_the_model_weight_fields_are_empty_and_the_rest_is_written(neurons, tmp_path, caplog):
    import dataclasses

    moved = dataclasses.replace(neurons, model="no-such-model-anywhere")
    feats = _features(export_neuronpedia(moved, tmp_path / "np"))
    assert feats[0]["logits_hist_data_bar_heights"] == [] and feats[0]["neuron_alignment_indices"] == []
    assert feats[0]["pos_str"] and feats[0]["activations"]
    assert "Neuronpedia export without neuron alignment and logits histograms" in caplog.text


def test_refusals_and_cli_options(neurons, store, tmp_path):
    from workbench.cli import cli

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError) as err:
        export_neuronpedia(neurons, tmp_path / "full")
    assert str(err.value) == f"{tmp_path / 'full'} is not empty; export into a new or empty folder"
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="latent 6 out of range: this result has 6 latents"):
        export_neuronpedia(neurons, tmp_path / "x", latents=[6])
    key = api.run(
        "dashboards", store=str(store.root), site=MLP, latents=6, **OPTS
    ).cache_key  # this test's home
    runner, out = CliRunner(), tmp_path / "cli"
    ok = runner.invoke(cli, ["export", key, str(out), "--model-id", "m", "--source-set", "s"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == f"written {out}"
    batch = json.loads((out / "batch-0.json").read_text())
    assert (batch["model_id"], batch["sae_set"], len(batch["features"])) == ("m", "s", 6)
    again = runner.invoke(cli, ["export", key, str(out)])
    assert (
        again.exit_code == 2
        and again.output.strip() == f"error: {out} is not empty; export into a new or empty folder"
    )


def test_head_distribution_is_each_heads_share_of_the_decoder_norm():
    """SAEDashboard's get_decoder_weights_distribution on a planted hook_z row: heads of norm 3, 4, 0, 5."""
    import torch

    from workbench.analyses.dashboards.neuronpedia import _head_dist

    row = torch.zeros(1, 4, 2)
    row[0, 0, 0], row[0, 1, 1], row[0, 3] = 3.0, 4.0, torch.tensor([3.0, 4.0])
    got = _head_dist(row.reshape(1, 8), n_heads=4, latents=[0])[0]
    assert got == pytest.approx([3 / 12, 4 / 12, 0.0, 5 / 12], abs=1e-5)
