"""dashboards: top contexts vs an independent torch.topk over the whole site, quantiles, histograms,
logits, neighbours, dictionary = neurons for a planted identity dictionary, cache (export: test_export.py)."""

from __future__ import annotations

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
    """Independent reference: the whole site with BOS rows masked out (-inf)."""
    X = store.read(SITE).float()  # [rows, d_mlp]
    pos = torch.arange(len(X)) % CTX
    return torch.where(pos[:, None] != 0, X, -torch.inf)


def _windows(store) -> list[tuple]:
    """Every row's shown token window (ids, -1 outside its sequence), as the dedupe key."""
    ids = store.token_ids().tolist()
    return [
        tuple(ids[w] if r // CTX * CTX <= w < r // CTX * CTX + CTX and w < len(ids) else -1
              for w in range(r - BEFORE, r + AFTER + 1))
        for r in range(len(ids))
    ]  # fmt: skip


def ref_top(col: torch.Tensor, windows: list[tuple], k: int) -> list[float]:
    """Top-k values of col (> 0, -inf = skipped) keeping the best row of each distinct window."""
    seen, out = set(), []
    for r in col.argsort(descending=True).tolist():
        if not col[r] > 0 or len(out) == k:
            break
        if windows[r] not in seen:
            seen.add(windows[r])
            out.append(float(col[r]))
    return out


def test_top_contexts_are_the_best_distinct_windows(store, neurons):
    X, windows = _site_acts(store), _windows(store)
    assert store.n_shards(SITE) > 1 and neurons.n_latents == X.shape[1]
    for j in range(0, X.shape[1], 9):
        ref = ref_top(X[:, j], windows, N_TOP)
        assert neurons.top_acts[j, : len(ref)].tolist() == pytest.approx(ref, abs=1e-6)
        neg = ref_top(-X[:, j].nan_to_num(neginf=torch.inf), windows, N_TOP)  # BOS: +inf -> skipped
        assert (-neurons.neg_acts[j, : len(neg)]).tolist() == pytest.approx(neg, abs=1e-6)
        rows = neurons.top_rows[j][neurons.top_rows[j] >= 0]
        assert len({windows[r] for r in rows.tolist()}) == len(rows)  # one example per window
    # the rows hold those values
    assert torch.equal(X.T.gather(1, neurons.top_rows.clamp(min=0))[neurons.top_rows >= 0],
                       neurons.top_acts[neurons.top_rows >= 0])  # fmt: skip
    assert torch.allclose(neurons.max_act, X.max(0).values.clamp(min=0))
    assert torch.allclose(neurons.min_act, X.nan_to_num(neginf=torch.inf).min(0).values.clamp(max=0))


def test_density_follows_the_firing_rule(store, neurons):
    """SwiGLU neurons take both signs: density counts |a| > 0.1 max|a|, not a > 0 (which is ~0.5)."""
    from workbench.firing import FIRE_FRACTION

    X = _site_acts(store)
    X = X[X[:, 0] > -torch.inf]  # non-BOS rows
    kept = len(X)
    assert neurons.n_tokens == kept
    signed = X.min(0).values < 0
    assert signed.all()  # the tiny Llama's gated MLP: every neuron signed
    t = FIRE_FRACTION * X.abs().max(0).values
    on = X.abs() > t
    assert torch.allclose(neurons.fire_threshold, t)
    assert torch.allclose(neurons.density, on.sum(0) / kept)
    assert torch.allclose(neurons.density_neg, (on & (X < 0)).sum(0) / kept)
    assert torch.allclose(neurons.mean_act, torch.where(on, X.abs(), 0).sum(0) / on.sum(0), atol=1e-5)
    assert ((X > 0).float().mean(0) - 0.5).abs().mean() < 0.2  # what "> 0" would have said
    assert "0.1 × max|a|" in neurons.firing_rule


def test_context_windows_hold_tokens_and_activations(store, neurons):
    raw, tokens = store.read(SITE).float(), store.token_ids()
    for j in (0, 7, 100):
        for rows, ctx_t, ctx_a, vals in (
            (neurons.top_rows, neurons.ctx_tokens, neurons.ctx_acts, neurons.top_acts),
            (neurons.neg_rows, neurons.neg_ctx_tokens, neurons.neg_ctx_acts, neurons.neg_acts),
        ):
            for slot in range(N_TOP):
                r = int(rows[j, slot])
                seq_start = r // CTX * CTX
                for w, row in enumerate(range(r - BEFORE, r + AFTER + 1)):
                    inside = seq_start <= row < seq_start + CTX
                    assert int(ctx_t[j, slot, w]) == (int(tokens[row]) if inside else -1)
                    if inside:
                        assert float(ctx_a[j, slot, w]) == pytest.approx(float(raw[row, j]), abs=1e-6)
                assert float(ctx_a[j, slot, BEFORE]) == pytest.approx(float(vals[j, slot]))
    view = neurons.latent(7)
    assert view["signed"] and [c["act"] for c in view["negative"]] == pytest.approx(
        neurons.neg_acts[7].tolist()
    )
    assert all(c["tokens"][c["max_index"]] == neurons.decoded[str(int(neurons.neg_ctx_tokens[7, i, BEFORE]))]
               for i, c in enumerate(view["negative"]))  # fmt: skip


def test_quantiles_and_histogram(store, neurons):
    """Signed units: intervals and histogram span [min, max]; quantile samples are firing tokens."""
    X = _site_acts(store)
    raw = store.read(SITE).float()
    n_q, s = 5, 5
    assert neurons.quantile_acts.shape == (X.shape[1], n_q * s)
    for j in (3, 50):
        lo, hi, t = float(neurons.min_act[j]), float(neurons.max_act[j]), float(neurons.fire_threshold[j])
        step = (hi - lo) / n_q
        for q in range(n_q):
            for k in range(s):
                row, act = (
                    int(neurons.quantile_rows[j, q * s + k]),
                    float(neurons.quantile_acts[j, q * s + k]),
                )
                if row < 0:
                    continue
                assert act == pytest.approx(float(raw[row, j])) and abs(act) > t
                assert lo + q * step - 1e-5 <= act <= lo + (q + 1) * step + 1e-5
                assert float(neurons.quantile_ctx_acts[j, q * s + k, BEFORE]) == pytest.approx(act)
        col = X[:, j][X[:, j] > -torch.inf]
        on = col[col.abs() > t]
        assert int(neurons.quantile_counts[j].sum()) == len(on)
        assert int(neurons.hist_counts[j].sum()) == len(col)  # signed: every token, both signs
        edges = torch.linspace(lo, hi, n_q + 1)
        ref_q = [int(((on > a) & (on <= b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
        assert (neurons.quantile_counts[j] - torch.tensor(ref_q)).abs().sum() <= 2
        ref = torch.histc(col, bins=32, min=lo, max=hi)
        assert (neurons.hist_counts[j].float() - ref).abs().sum() <= 2  # edge ties may fall either side
        assert neurons.hist_edges[j, 0] == pytest.approx(lo) and neurons.hist_edges[j, -1] == pytest.approx(
            hi
        )


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
    logits = W_out @ tiny_model.W_U.detach().float()  # the tiny model's final-norm gain is 1
    logits -= logits.mean(-1, keepdim=True)  # logit effects are reported relative to the mean
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
    assert "W_out[layer] @ W_U" in neurons.logit_note and "diag(γ_final)" in neurons.logit_note


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
    X = _site_acts(store)[:, :40]
    assert torch.allclose(res.density, (X > 0).sum(0) / (X[:, 0] > -torch.inf).sum())  # a > 0 for latents
    assert (res.min_act == 0).all() and (res.fire_threshold == 0).all() and (res.neg_rows == -1).all()
    assert res.latent(3)["negative"] == [] and not res.latent(3)["signed"]
    assert (res.neighbor_cos[:, 0].abs() < 1e-6).all()  # identity decoder: orthogonal latents


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
