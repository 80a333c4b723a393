"""dashboards on planted ground truth: a negative maximum shows as the top negative example,
repeated text gives one example per token window, and the logit effects of a raw model with a
non-trivial final-norm gain equal TransformerLens' own norm-folded (compat) computation."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

SITE = "blocks.0.mlp.hook_post"
CTX, BEFORE, AFTER, N_TOP = 32, 6, 2, 5
SENTENCE = "The old lighthouse keeper walked along the rocky shore every morning before dawn."


@pytest.fixture(scope="module")
def repeated_store(tiny_model, tmp_path_factory):
    """A store of one sentence repeated: the same token windows occur many times."""
    from workbench.capture import CaptureConfig, capture
    from workbench.context import POOL

    POOL.put(tiny_model)
    text = tmp_path_factory.mktemp("text") / "repeated.txt"
    text.write_text((SENTENCE + "\n") * 80)
    cfg = CaptureConfig(
        model=tiny_model.workbench.key, sites=(SITE,), data=str(text), n_tokens=12 * CTX, ctx_len=CTX,
        shard_tokens=128,
    )  # fmt: skip
    return capture(cfg, model=tiny_model, out=tmp_path_factory.mktemp("store"), progress=False)


def _dashboards(store, **kw):
    from workbench.analyses.dashboards import DashboardConfig, run
    from workbench.context import Context

    cfg = DashboardConfig(
        store=str(store.root), site=SITE, n_top=N_TOP, window_before=BEFORE, window_after=AFTER, **kw
    )
    return run(cfg, Context(show_bars=False))


def test_repeated_text_gives_one_example_per_window(repeated_store):
    res = _dashboards(repeated_store)
    ids = repeated_store.token_ids()
    for j in range(res.n_latents):
        for t in (res.ctx_tokens[j], res.neg_ctx_tokens[j]):
            shown = [tuple(w.tolist()) for w in t if (w >= 0).any()]
            assert len(shown) == len(set(shown)), f"unit {j} repeats a window"
    # without the dedupe the top lists would hold copies: windows recur many times in this store
    windows = [tuple(ids[q - BEFORE : q + AFTER + 1].tolist()) for q in range(len(ids))
               if BEFORE <= q % CTX < CTX - AFTER]  # fmt: skip
    assert len(windows) > 3 * len(set(windows))
    assert (res.top_rows >= 0).sum(1).min() >= 3  # still several distinct examples per unit


def _plant(store, tmp_path, unit: int, row: int, value: float):
    """A copy of the store whose `unit` reads `value` at `row` (shard rewritten, manifest updated)."""
    from workbench.shard_files import write_safetensors
    from workbench.store import ActivationStore, read_manifest, write_manifest

    root = tmp_path / "planted"
    shutil.copytree(store.root, root)
    records = read_manifest(root)
    for i, rec in enumerate(records):
        if rec.site == SITE and rec.row_start <= row < rec.row_end:
            acts = ActivationStore(root).shard(SITE, rec.shard).clone()
            acts[row - rec.row_start, unit] = value
            size, digest = write_safetensors(rec.path(root), "acts", acts, {"site": SITE})
            records[i] = dataclasses.replace(rec, bytes=size, checksum=digest)
    write_manifest(root, records)
    return ActivationStore(root)


def test_planted_negative_maximum_is_the_top_negative_example(repeated_store, tmp_path):
    unit, row = 11, 5 * CTX + 9
    X = repeated_store.read(SITE).float()
    value = -20 * float(X[:, unit].abs().max())
    res = _dashboards(_plant(repeated_store, tmp_path, unit, row, value))
    assert int(res.neg_rows[unit, 0]) == row
    assert float(res.neg_acts[unit, 0]) == pytest.approx(value, rel=1e-3)  # fp16/32 store
    assert float(res.min_act[unit]) == pytest.approx(value, rel=1e-3)
    view = res.latent(unit)
    assert view["signed"] and view["negative"][0]["act"] == pytest.approx(value, rel=1e-3)
    top_neg = view["negative"][0]
    assert top_neg["acts"][top_neg["max_index"]] == pytest.approx(value, rel=1e-3)
    # the planted |a| sets the unit's scale: only it fires now (threshold 0.1 × |value| = 2 max|a|)
    assert float(res.fire_threshold[unit]) == pytest.approx(0.1 * abs(value), rel=1e-3)
    assert float(res.density[unit]) == pytest.approx(1 / res.n_tokens)
    assert float(res.density_neg[unit]) == float(res.density[unit])
    assert int(res.hist_counts[unit, 0]) >= 1 and float(res.hist_edges[unit, 0]) == pytest.approx(
        value, rel=1e-3
    )
    # the positive side is untouched
    keep = torch.arange(len(X)) % CTX != 0
    assert float(res.max_act[unit]) == pytest.approx(float(X[keep, unit].max().clamp(min=0)), rel=1e-3)


@pytest.fixture(scope="module")
def gamma_llama(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a random final-norm gain γ in [0.2, 2.2] (the default one has γ = 1)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gamma") / "llama-gamma"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.copy_(
            torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 2 + 0.2
        )
    model.save_pretrained(folder)
    return folder


def test_raw_logit_table_equals_the_norm_folded_compat_computation(gamma_llama, wikitext):
    """SAEDashboard's numbers: W_out @ W_U of the compat (fold_ln + center_unembed) model."""
    import workbench as wb
    from workbench.models import load_model

    store = wb.capture(
        model=str(gamma_llama), data=wikitext, n_tokens=4 * CTX, ctx_len=CTX, sites=(SITE,), progress=False
    )
    res = wb.run("dashboards", store=str(store.root), site=SITE, n_top=2, window_before=2, window_after=1)
    assert store.config["processing"] == "raw"
    compat = load_model(str(gamma_llama), "compat")
    ref = compat.W_out[0].detach().float() @ compat.W_U.detach().float()  # TransformerLens' folding
    vals, ids = ref.topk(10)
    assert torch.equal(res.top_logit_ids, ids)
    assert torch.allclose(res.top_logit_vals, vals, atol=1e-5)
    vals, ids = ref.topk(10, largest=False)
    assert torch.equal(res.bottom_logit_ids, ids)
    assert torch.allclose(res.bottom_logit_vals, vals, atol=1e-5)
    # the gain matters: W_U as loaded (no γ) ranks other tokens
    raw = load_model(str(gamma_llama), "raw")
    unfolded = raw.W_out[0].detach().float() @ raw.W_U.detach().float()
    assert (unfolded.topk(10).indices != res.top_logit_ids).any(-1).float().mean() > 0.5
    assert "diag(γ_final)" in res.logit_note


def test_firing_rule_units():
    from workbench.firing import fire_threshold, fires, is_signed, top_units

    lo, hi = torch.tensor([0.0, -3.0, -0.17, -5.0]), torch.tensor([2.0, 1.0, 4.0, 0.0])
    t = fire_threshold(lo, hi)
    assert t.tolist() == pytest.approx([0.0, 0.3, 0.4, 0.5])
    assert is_signed(lo).tolist() == [False, True, True, True]
    a = torch.tensor([[1e-3, -0.31, -0.17, -0.4], [0.0, 0.29, 0.41, -0.6]])
    assert fires(a, t).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert top_units(torch.tensor([0.5, -2.0, 1.0, 0.1]), 2) == [(1, -2.0), (2, 1.0)]


def test_unique_topk_matches_a_brute_force_reference():
    """Streamed in uneven batches, with copies of windows inside and across batches."""
    from workbench.analyses.dashboards.topk import UniqueTopK

    gen = torch.Generator().manual_seed(0)
    rows, n, k = 300, 7, 6
    v = torch.randn(rows, n, generator=gen)
    v[v < -1] = -torch.inf  # some rows are not candidates
    hashes = torch.randint(0, 40, (rows,), generator=gen)  # ~7 copies of each window
    top = UniqueTopK(n, k)
    for lo, hi in ((0, 5), (5, 100), (100, 101), (101, 300)):
        top.add(v[lo:hi], torch.arange(lo, hi), hashes[lo:hi])
    vals, got_rows = top.result()
    for j in range(n):
        best: dict[int, tuple[float, int]] = {}
        for r in range(rows):
            if v[r, j] > -torch.inf and (int(hashes[r]) not in best or v[r, j] > best[int(hashes[r])][0]):
                best[int(hashes[r])] = (float(v[r, j]), r)
        ref = sorted(best.values(), reverse=True)[:k]
        assert vals[j].tolist() == pytest.approx([x for x, _ in ref])
        assert got_rows[j].tolist() == [r for _, r in ref]
        assert len(set(hashes[got_rows[j]].tolist())) == k


def test_hook_z_directions_go_through_w_o_even_when_n_heads_d_head_equals_d_model(tiny_model):
    """A hook_z latent writes W_dec @ W_O, not W_dec read as a residual direction; tiny GPT-2 has
    n_heads * d_head == d_model, the shape that made the old width test take the wrong branch."""
    from types import SimpleNamespace

    from workbench.analyses.dashboards.compute import directions

    cfg = tiny_model.cfg
    assert cfg.n_heads * cfg.d_head == cfg.d_model
    W_dec = torch.randn(7, cfg.n_heads * cfg.d_head, generator=torch.Generator().manual_seed(0))
    meta = SimpleNamespace(hook_name="blocks.1.attn.hook_z", hook_name_out=None)
    sae = SimpleNamespace(W_dec=W_dec, cfg=SimpleNamespace(metadata=meta))
    D, how = directions(sae, tiny_model, "blocks.1.attn.hook_z")
    W_O = tiny_model.W_O[1].detach().float()  # [n_heads, d_head, d_model]
    expected = torch.einsum("lhd,hdm->lm", W_dec.view(7, cfg.n_heads, cfg.d_head), W_O)
    torch.testing.assert_close(D, expected)
    assert how == "W_dec @ W_O[layer] @ W_U"
