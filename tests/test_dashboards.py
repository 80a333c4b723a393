"""dashboards: top contexts vs an independent torch.topk over the whole site, quantiles, histograms,
logits, neighbours, dictionary = neurons for a planted identity dictionary, Neuronpedia export, cache."""

from __future__ import annotations

import json

import pytest
import torch

SITE = "blocks.0.mlp.hook_post"
CTX, BEFORE, AFTER, N_TOP = 32, 6, 2, 5


@pytest.fixture(scope="module")
def store(tiny_model, wikitext, tmp_path_factory):
    from workbench.capture import CaptureConfig, capture
    from workbench.context import POOL

    POOL.put(tiny_model)  # the analyses' ctx.model() finds it instead of booting it again

    cfg = CaptureConfig(
        model=tiny_model.workbench.key,
        sites=(SITE,),
        data=wikitext,
        n_tokens=16 * CTX,
        ctx_len=CTX,
        shard_tokens=128,
    )
    return capture(cfg, model=tiny_model, out=tmp_path_factory.mktemp("store"), progress=False)


def _run(store, **kw):
    from workbench import api

    opts = dict(store=str(store.root), site=SITE, n_top=N_TOP, window_before=BEFORE, window_after=AFTER)
    return api.run("dashboards", **(opts | {"token_batch": 50} | kw))


@pytest.fixture(scope="module")
def neurons(store):
    """Neuron dashboards of the whole site, computed once for the module (outside the cache)."""
    from workbench.analyses.dashboards import DashboardConfig, run
    from workbench.context import Context

    cfg = DashboardConfig(
        store=str(store.root), site=SITE, n_top=N_TOP, window_before=BEFORE, window_after=AFTER
    )
    return run(cfg, Context(show_bars=False))


def _site_acts(store) -> torch.Tensor:
    """Independent reference: the whole site with BOS rows and non-firing entries masked out."""
    X = store.read(SITE).float()  # [rows, d_mlp]
    pos = torch.arange(len(X)) % CTX
    return torch.where((X > 0) & (pos[:, None] != 0), X, -torch.inf)


def test_top_contexts_are_the_global_argmax_rows(store, neurons):
    X = _site_acts(store)
    vals, rows = X.T.topk(N_TOP, dim=1)  # [d_mlp, n_top]
    assert store.n_shards(SITE) > 1 and neurons.n_latents == X.shape[1]
    assert torch.allclose(neurons.top_acts, vals)
    # the rows hold those values (ties, e.g. repeated text, may come in either order)
    assert torch.equal(X.T.gather(1, neurons.top_rows), vals)
    assert (neurons.top_rows == rows).float().mean() > 0.9
    assert torch.allclose(neurons.max_act, vals[:, 0])
    fires = X > -torch.inf
    kept = (torch.arange(len(X)) % CTX != 0).sum()
    assert neurons.n_tokens == kept
    assert torch.allclose(neurons.density, fires.sum(0) / kept)
    assert torch.allclose(
        neurons.mean_act, torch.where(fires, X, 0).sum(0) / fires.sum(0).clamp(min=1), atol=1e-5
    )


def test_context_windows_hold_tokens_and_activations(store, neurons):
    raw, tokens = store.read(SITE).float(), store.token_ids()
    for j in (0, 7, 100):
        for slot in range(N_TOP):
            r = int(neurons.top_rows[j, slot])
            seq_start = r // CTX * CTX
            for w, row in enumerate(range(r - BEFORE, r + AFTER + 1)):
                inside = seq_start <= row < seq_start + CTX
                assert int(neurons.ctx_tokens[j, slot, w]) == (int(tokens[row]) if inside else -1)
                if inside:
                    assert float(neurons.ctx_acts[j, slot, w]) == pytest.approx(float(raw[row, j]), abs=1e-6)
            assert float(neurons.ctx_acts[j, slot, BEFORE]) == pytest.approx(float(neurons.top_acts[j, slot]))


def test_quantiles_and_histogram(store, neurons):
    X = _site_acts(store)
    raw = store.read(SITE).float()
    n_q, s = 5, 5
    assert neurons.quantile_acts.shape == (X.shape[1], n_q * s)
    for j in (3, 50):
        m = float(neurons.max_act[j])
        for q in range(n_q):
            for t in range(s):
                row, act = (
                    int(neurons.quantile_rows[j, q * s + t]),
                    float(neurons.quantile_acts[j, q * s + t]),
                )
                if row < 0:
                    continue
                assert (
                    act == pytest.approx(float(raw[row, j]))
                    and q * m / n_q - 1e-6 <= act <= (q + 1) * m / n_q + 1e-6
                )
                assert float(neurons.quantile_ctx_acts[j, q * s + t, BEFORE]) == pytest.approx(act)
        on = X[:, j][X[:, j] > -torch.inf]
        assert int(neurons.hist_counts[j].sum()) == len(on) == int(neurons.quantile_counts[j].sum())
        edges = torch.linspace(0, m, n_q + 1)
        ref_q = [int(((on > lo) & (on <= hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
        assert (neurons.quantile_counts[j] - torch.tensor(ref_q)).abs().sum() <= 2
        ref = torch.histc(on, bins=32, min=0, max=m)
        assert (neurons.hist_counts[j].float() - ref).abs().sum() <= 2  # edge ties may fall either side
        assert neurons.hist_edges[j, -1] == pytest.approx(m)


def test_correlated_neighbours_match_numpy_corrcoef(store, neurons):
    import numpy as np

    X = store.read(SITE).float().numpy()
    X = X[np.arange(len(X)) % CTX != 0]  # BOS rows are skipped by default
    corr = np.corrcoef(X.T)
    np.fill_diagonal(corr, -np.inf)
    live = X.std(0) > 0
    corr[:, ~live] = -np.inf
    for j in np.flatnonzero(live)[:20]:
        order = np.argsort(-corr[j])[:8]
        assert neurons.corr_neighbors[j].tolist() == order.tolist()
        assert neurons.corr_values[j].numpy() == pytest.approx(corr[j, order], abs=1e-4)
    assert neurons.latent(3)["correlated"][0][0] == int(neurons.corr_neighbors[3, 0])


def test_logits_and_neighbors_from_W_out(tiny_model, neurons):
    W_out = tiny_model.W_out[0].detach().float()  # [d_mlp, d_model]
    logits = W_out @ tiny_model.W_U.detach().float()
    assert torch.equal(neurons.top_logit_ids, logits.topk(10).indices)
    assert torch.equal(neurons.bottom_logit_ids, logits.topk(10, largest=False).indices)
    U = W_out / W_out.norm(dim=-1, keepdim=True)
    cos = U @ U.T
    cos.fill_diagonal_(-2)
    assert torch.equal(neurons.neighbors[:, 0], cos.argmax(-1))
    assert torch.allclose(neurons.neighbor_cos[:, 0], cos.max(-1).values, atol=1e-5)
    view = neurons.latent(7)
    assert view["neighbors"][0] == (int(cos[7].argmax()), pytest.approx(float(cos[7].max()), abs=1e-5))
    assert view["pos_logits"][0] == (
        neurons.decoded[str(int(logits[7].argmax()))],
        pytest.approx(float(logits[7].max())),
    )
    assert len(view["top"]) == N_TOP and len(view["top"][0]["tokens"]) == len(view["top"][0]["acts"])
    assert "W_out[layer] @ W_U" in neurons.logit_note


def test_identity_dictionary_reproduces_neuron_dashboards(store, neurons, tmp_path):
    """A planted dictionary with latent j = ReLU(neuron j), decoder = identity: same dashboards."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d = store.shape(SITE)[0]
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, metadata=SAEMetadata(hook_name=SITE)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(tmp_path / "id")
    res = _run(store, site="", dictionary=str(tmp_path / "id"), latents=40)
    assert res.n_latents == 40 and res.source == str(tmp_path / "id")
    assert torch.equal(res.top_rows, neurons.top_rows[:40])
    assert torch.allclose(res.ctx_acts, neurons.ctx_acts[:40].clamp(min=0), atol=1e-6)
    assert torch.equal(res.top_logit_ids, neurons.top_logit_ids[:40])  # W_dec @ W_out @ W_U
    assert torch.allclose(res.density, neurons.density[:40])
    assert (res.neighbor_cos[:, 0].abs() < 1e-6).all()  # identity decoder: orthogonal latents


def test_neuronpedia_export_round_trip(neurons, tmp_path):
    from workbench.analyses.dashboards import export_neuronpedia

    path = export_neuronpedia(neurons, tmp_path / "batch-0.json", latents=[0, 5])
    batch = json.loads(path.read_text())
    assert batch["layer"] == 0 and batch["sae_set"] == "neurons" and len(batch["features"]) == 2
    feat = batch["features"][1]
    for key in ("modelId", "layer", "index", "maxActApprox", "pos_str", "pos_values", "neg_str", "neg_values",
                "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "activations"):  # fmt: skip
        assert key in feat, key
    assert feat["index"] == 5 and feat["frac_nonzero"] == pytest.approx(float(neurons.density[5]))
    top = feat["activations"][0]
    assert top["maxValue"] == pytest.approx(float(neurons.max_act[5]), abs=1e-3)
    assert top["values"][top["maxValueTokenIndex"]] == pytest.approx(top["maxValue"], abs=1e-3)
    assert (
        top["tokens"][top["maxValueTokenIndex"]]
        == neurons.decoded[str(int(neurons.ctx_tokens[5, 0, BEFORE]))]
    )
    assert feat["pos_str"] == [t for t, _ in neurons.latent(5)["pos_logits"]]


def test_cache_round_trip_table_figures_and_errors(store):
    from workbench import api

    first = _run(store, latents=16)
    again = _run(store, latents=16)
    for name in ("top_rows", "ctx_acts", "quantile_ctx_tokens", "hist_counts", "neighbors"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert again.latent(3) == first.latent(3) and again.decoded == first.decoded
    rows = again.table()
    assert len(rows) == 16 and set(rows[0]) >= {"latent", "density", "max_act", "mean_act", "top_tokens"}
    assert set(again.figures()) == {"latent density", "density vs max activation"}
    with pytest.raises(Exception, match="not in this store"):
        api.run("dashboards", store=str(store.root), site="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="needs --site"):
        api.run("dashboards", store=str(store.root))
    with pytest.raises(IndexError, match="out of range"):
        again.latent(99)
