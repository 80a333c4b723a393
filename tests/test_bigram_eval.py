"""Bigram-subnetwork evaluation (analyses/bigram/evaluate.py) against independent computations."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch
from conftest import WIKITEXT

from workbench import bigram, data
from workbench.masks import MaskSet, apply_mask, maskable

# the package re-exports the function `evaluate`, which hides the module of that name
ev = importlib.import_module("workbench.analyses.bigram.evaluate")


@pytest.fixture(scope="module")
def setup(tiny_model):
    tok = tiny_model.tokenizer
    target = bigram.count(str(WIKITEXT), tok, tiny_model.cfg.d_vocab, progress=False)
    tokens = ev.held_out_tokens(str(WIKITEXT), tok, ctx_len=24, bos="prepend", skip_seqs=3, n_seqs=5)
    gen = torch.Generator().manual_seed(1)
    mask = MaskSet({n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in maskable(tiny_model).items()})
    specials = [tok.bos_token_id, tok.eos_token_id]
    return tiny_model, target, tokens, mask, specials


def _surprisal(model, tokens, vocab):
    log_q = model(tokens)[..., :vocab].float().log_softmax(-1)
    return -log_q[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1), log_q


def test_held_out_tokens_are_the_packed_sequences_after_the_training_ones(tiny_model, tmp_path):
    tok = tiny_model.tokenizer
    got = ev.held_out_tokens(str(WIKITEXT), tok, 24, "prepend", skip_seqs=3, n_seqs=5)
    want = [s.tokens for s in itertools.islice(data.pack(str(WIKITEXT), tok, 24, "prepend"), 3, 8)]
    assert got.tolist() == want
    short = tmp_path / "short.txt"
    short.write_text("one two three four five six seven eight nine ten " * 6)  # 61 tokens: 2 sequences
    with pytest.raises(ValueError) as err:
        ev.held_out_tokens(str(short), tok, 24, "prepend", skip_seqs=1, n_seqs=5)
    assert str(err.value) == (
        f"text source {short} has 2 sequences of 24 tokens; the held-out text needs 5 after the 1 training "
        "ones: pass fewer eval tokens or more text"
    )


def test_evaluation_equals_an_independent_computation(setup):
    model, target, tokens, mask, specials = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = ev.evaluate(model, mask, target, tokens, specials, ev.EvalSettings(batch_size=2, n_random=2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the pooled model is untouched

    vocab = target.vocab_size
    with torch.no_grad():
        full_s, full_lq = _surprisal(model, tokens, vocab)
        with apply_mask(model, mask):
            sub_s, sub_lq = _surprisal(model, tokens, vocab)
        with apply_mask(model, mask.complement()):
            comp_s, _ = _surprisal(model, tokens, vocab)
    rows = {r["variant"]: r for r in out.ablation}
    assert rows["full model"]["mean_surprisal"] == pytest.approx(float(full_s.mean()), rel=1e-5)
    assert rows["subnetwork"]["mean_surprisal"] == pytest.approx(float(sub_s.mean()), rel=1e-5)
    assert rows["complement"]["mean_surprisal"] == pytest.approx(float(comp_s.mean()), rel=1e-5)
    assert rows["subnetwork"]["kept_fraction"] == pytest.approx(mask.kept() / mask.total())
    assert len(out.ablation) == 5 and "mean of 2" in out.ablation[3]["variant"]

    # r: numpy's Pearson over the positions whose bigram surprisal is finite
    prev = target.contexts(tokens[:, :-1].flatten(), specials)
    b = target.surprisal(prev, tokens[:, 1:].flatten()).numpy()
    finite = np.isfinite(b)
    assert (~finite).sum() == out.n_inf_dropped and finite.sum() == out.n_r
    assert out.r_bigram == pytest.approx(
        np.corrcoef(sub_s.flatten().numpy()[finite], b[finite])[0, 1], abs=1e-5
    )

    # CE to the dense bigram target, over every position
    ctx = target.contexts(tokens.flatten(), specials)
    dense_ce = -(target.dense(ctx) * sub_lq.flatten(0, 1)).sum(-1).mean()
    assert out.ce_bigram == pytest.approx(float(dense_ce), rel=1e-5)
    full_ce = -(target.dense(ctx) * full_lq.flatten(0, 1)).sum(-1).mean()
    assert out.ce_bigram_full == pytest.approx(float(full_ce), rel=1e-5)

    names, kept, total = ev.kept_by_matrix(mask)
    assert out.matrix_names == names and sum(kept) == mask.kept() and sum(total) == mask.total()


def test_full_mask_reproduces_the_full_model(setup):
    model, target, tokens, _, specials = setup
    out = ev.evaluate(model, MaskSet.full(model), target, tokens, specials, ev.EvalSettings(n_random=0))
    rows = {r["variant"]: r for r in out.ablation}
    assert rows["subnetwork"]["mean_surprisal"] == rows["full model"]["mean_surprisal"]
    assert len(out.ablation) == 3  # no random rows when n_random = 0
    torch.testing.assert_close(out.covsim_sub, out.covsim_full)


def test_covariance_similarity_equals_torch_cov_over_cached_activations(setup):
    model, target, tokens, _, specials = setup
    out = ev.evaluate(model, MaskSet.full(model), target, tokens, specials, ev.EvalSettings(n_random=0))
    n_layers = model.cfg.n_layers
    sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in sites)
    covs = torch.stack([torch.cov(cache[s][:, 1:].reshape(-1, model.cfg.d_model).double().T) for s in sites])
    flat = covs.flatten(1) / covs.flatten(1).norm(dim=1, keepdim=True)
    want = (flat @ flat.T).float()  # torch.cov's n−1 normalisation cancels in the cosine
    assert out.covsim_full.shape == (n_layers + 1, n_layers + 1)
    torch.testing.assert_close(out.covsim_full, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.covsim_full.diagonal(), torch.ones(n_layers + 1), atol=1e-5, rtol=0)


def test_dropinf_r_drops_infinite_bigram_surprisals_and_caps_model_infs():
    model_s = torch.tensor([1.0, 2.0, float("inf"), 4.0, 5.0, 9.0])
    bigram_s = torch.tensor([1.5, 2.5, 3.0, float("inf"), 4.0, 7.0])
    r, n, dropped = ev.dropinf_r(model_s, bigram_s)
    x = np.array([1.0, 2.0, 9.0, 5.0, 9.0])  # the model's inf -> its largest finite value, 9
    y = np.array([1.5, 2.5, 3.0, 4.0, 7.0])
    assert (n, dropped) == (5, 1)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_layer_and_kind_names():
    assert ev.layer_and_kind("model.layers.3.mlp.up_proj.weight") == (3, "mlp.up_proj")
    assert ev.layer_and_kind("transformer.h.0.attn.c_attn.weight") == (0, "attn.c_attn")
    with pytest.raises(ValueError, match="not a block weight: lm_head.weight"):
        ev.layer_and_kind("lm_head.weight")


def test_result_counts_figures_and_round_trip(setup):
    from safetensors.torch import load, save

    from workbench.analyses.bigram.result import BigramResult

    model, target, tokens, mask, specials = setup
    out = ev.evaluate(model, mask, target, tokens, specials, ev.EvalSettings(n_random=1))
    result = BigramResult.from_eval(out, model="tiny-llama", held_out="wiki seqs 3-7")
    first_mlp = sum(int(m.sum()) for n, m in mask.masks.items() if n.startswith("model.layers.0.mlp."))
    assert result.first_mlp_share == pytest.approx(first_mlp / mask.kept())
    assert result.kept_fraction == pytest.approx(mask.kept_fraction())
    layers, kinds, kept, size = result.by_layer_kind()
    assert layers == [0, 1] and "mlp.up_proj" in kinds and "self_attn.q_proj" in kinds
    assert int(kept.sum()) == mask.kept() and int(size.sum()) == mask.total()
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert int(kept[0, kinds.index("self_attn.q_proj")]) == int(mask.masks[q0].sum())
    align = result.alignment()
    torch.testing.assert_close(align["subnetwork: next token"], out.covsim_sub[:, -1])
    assert set(result.figures()) == {
        "Kept weights by layer and matrix",
        "Ablation: mean surprisal",
        "Surprisal: subnetwork vs bigram",
        "Current- vs next-token alignment by layer",
        "Layer covariance similarity",
    }
    assert result.summary()[3] == {"measure": "surprisal r with the bigram model", "value": out.r_bigram}
    plain, arrays = result.to_payload()
    again = BigramResult.from_payload(plain, load(save(arrays)))
    assert again.ablation == result.ablation and torch.equal(again.covsim_full, result.covsim_full)
