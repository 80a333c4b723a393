"""The snmf analysis, SNMF folders as a dictionary kind, and the steering comparison's scores.

Each check is against an independent computation: the SNMF estimator itself (transform, F), the
norm-folded unembedding done by hand, brute-force pairwise AUROC and scikit-learn's."""

import pytest
import torch

from workbench import api
from workbench.analyses.snmf import concepts as cs
from workbench.analyses.snmf.features import fit_rows, top_contexts
from workbench.sae.snmf import SNMF, SNMFError
from workbench.sae.snmf_dictionary import to_dictionary

SITE = "blocks.1.mlp.hook_post"


def _fit_random(seed=0, n=300, d=64, rank=6):
    gen = torch.Generator().manual_seed(seed)
    A = torch.rand(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen) + 0.01 * torch.randn(
        n, d, generator=gen
    )
    return A, SNMF(rank, sparsity=0.25, max_iter=60, patience=20, seed=seed).fit(A)


def test_snmf_folder_loads_and_encode_equals_transform(tmp_path):
    from workbench.lens import load_dictionary as lens_load
    from workbench.sae.io import load_dictionary, save_dictionary

    A, est = _fit_random()
    folder = save_dictionary(to_dictionary(est.components_, {"hook_name": SITE}), tmp_path / "snmf")
    for sae in (load_dictionary(folder), lens_load(folder)):
        assert sae.cfg.architecture() == "snmf" and sae.cfg.d_sae == 6 and sae.cfg.d_in == 64
        assert torch.equal(sae.W_dec, est.components_.T)
        G = sae.encode(A)
        assert (G >= 0).all()
        assert torch.equal(G, est.transform(A))  # the same solver on the same F, bit for bit
        torch.testing.assert_close(sae.decode(G), est.inverse_transform(G), rtol=1e-5, atol=1e-5)
        # a batch [b, pos, d] encodes like its rows
        torch.testing.assert_close(
            sae.encode(A[:40].reshape(4, 10, 64)).reshape(40, 6), est.transform(A[:40])
        )


def test_fit_rows_exclude_bos_and_cap(tiny_store):
    store = tiny_store((SITE,), 256)
    rows, A = fit_rows(store, SITE, 100, True, lambda it, **kw: it)
    assert len(rows) == 100 and (store.positions()[rows] != 0).all()
    torch.testing.assert_close(A, store.read(SITE)[rows])
    rows_all, _ = fit_rows(store, SITE, 0, True, lambda it, **kw: it)
    assert len(rows_all) == int((store.positions() != 0).sum())


def test_top_contexts_center_is_the_top_coefficient():
    G = torch.zeros(40, 2)
    G[5, 0], G[17, 0], G[30, 1] = 3.0, 2.0, 1.5  # planted: feature 0 tops at rows 5 and 17
    rows = torch.arange(40)
    token_ids = torch.arange(100, 140)
    out = top_contexts(G, rows, token_ids, ctx_len=20, n_top=2, before=3, after=1)
    assert out["top_rows"][0].tolist() == [5, 17] and out["top_rows"][1, 0] == 30
    assert out["ctx_coefs"][0, 0, 3] == 3.0 and out["ctx_coefs"][0, 1, 3] == 2.0
    assert out["ctx_tokens"][0, 0].tolist() == [102, 103, 104, 105, 106]
    # row 17's window stops at its sequence end (rows 0-19): the token after it is row 18, inside
    assert out["ctx_tokens"][0, 1].tolist() == [114, 115, 116, 117, 118]
    assert out["ctx_tokens"][1, 0, -1] == -1 or out["ctx_tokens"][1, 0].tolist() == [127, 128, 129, 130, 131]


def test_snmf_analysis_parity(tiny_store, tiny_model):
    from workbench.analyses.dashboards.logits import folded_unembed
    from workbench.sae.io import load_dictionary

    store = tiny_store((SITE,), 256)
    r = api.run("snmf", store=str(store.root), rank=4, n_tokens=200, max_iter=20, n_top=3)
    assert r.n_tokens == 200 and r.warning == "" and "BOS" in r.rows_note and "G >" in r.density_rule
    sae = load_dictionary(r.dictionary)
    F = sae.W_dec.T.detach()  # [d_mlp, rank]
    # neurons: the largest |F| per feature
    assert torch.equal(r.neuron_ids[:, 0], F.abs().argmax(0))
    # vocabulary projection done by hand: F[:,k]ᵀ W_out, γ_final folded into W_U, row mean removed
    W_U, _ = folded_unembed(tiny_model)
    logits = (F.T @ tiny_model.W_out[1].detach().float()) @ W_U
    logits -= logits.mean(-1, keepdim=True)
    assert torch.equal(r.top_logit_ids[:, 0], logits.argmax(-1))
    # contexts and density from the dictionary's own encoding of the fitted rows
    rows, A = fit_rows(store, SITE, 200, True, lambda it, **kw: it)
    G = sae.encode(A)
    torch.testing.assert_close(r.max_coef, G.max(0).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r.top_coefs[:, 0], G.max(0).values, rtol=1e-4, atol=1e-6)
    assert torch.equal(r.density, (G > 0.1 * G.max(0).values).float().mean(0))


def test_dashboards_and_prompt_lens_read_an_snmf_folder(tiny_store, tiny_model, tiny_model_dir):
    from workbench.lens import prompt_lens

    store = tiny_store((SITE,), 256)
    r = api.run("snmf", store=str(store.root), rank=4, n_tokens=200, max_iter=20)
    dash = api.run(
        "dashboards", store=str(store.root), dictionary=r.dictionary, model=str(tiny_model_dir), n_top=3
    )
    assert dash.n_latents == 4 and "W_dec @ W_out[layer]" in dash.logit_note
    torch.testing.assert_close(dash.top_logit_ids, r.top_logit_ids)  # one code path for the projection
    lens = prompt_lens(tiny_model, "The cat sat on the mat.", layer=1, dictionary=r.dictionary)
    assert lens["latents"]


def test_bad_input_is_one_line(tiny_store):
    store = tiny_store((SITE, "blocks.1.hook_resid_post"), 256)
    with pytest.raises(SNMFError, match=r"sparsity must be in \(0, 1\]"):
        api.run("snmf", store=str(store.root), sparsity=0.0)
    with pytest.raises(SNMFError, match="rank 500 is larger than the data: 200 tokens"):
        api.run("snmf", store=str(store.root), rank=500, n_tokens=200)
    r = api.run(
        "snmf", store=str(store.root), site="blocks.1.hook_resid_post", rank=3, n_tokens=100, max_iter=5
    )
    assert r.warning.startswith("blocks.1.hook_resid_post is not an MLP activation (mlp.hook_post)")
    with pytest.raises(cs.ConceptError, match="unknown concept 'cooking'"):
        api.run("snmf-steering", snmf=r.dictionary, concepts="cooking")
    with pytest.raises(ValueError, match="targets must be KL values > 0"):
        api.run("snmf-steering", snmf=r.dictionary, targets="0,0.1")


def test_auroc_matches_brute_force_and_sklearn():
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(13, 3, generator=gen) + 0.5, torch.randn(11, 3, generator=gen)
    pos[0, 0] = neg[0, 0]  # a tie counts 1/2
    got = cs.auroc(pos, neg)
    for u in range(3):
        brute = sum(float(p > n) + 0.5 * float(p == n) for p in pos[:, u] for n in neg[:, u]) / (13 * 11)
        assert float(got[u]) == pytest.approx(brute, abs=1e-6)
    metrics = pytest.importorskip("sklearn.metrics")
    labels = [1] * 13 + [0] * 11
    for u in range(3):
        ref = metrics.roc_auc_score(labels, torch.cat([pos[:, u], neg[:, u]]).numpy())
        assert float(got[u]) == pytest.approx(ref, abs=1e-6)


def test_concept_sets_and_token_ids(tiny_model):
    concepts = cs.load_concepts("all")
    assert [c.name for c in concepts] == list(cs.BUILTIN)
    for c in concepts:
        assert len(c.positive) == 20 and len(c.neutral) == 24 and len(c.words) == 15
    ids = cs.token_ids(tiny_model.tokenizer, ["food"])
    assert sorted(tiny_model.tokenizer.decode([i]) for i in ids) == [" Food", " food"]  # one GPT-2 token each
    # concept probability: the summed probability of the ids at each prompt's last real position
    lp = torch.log_softmax(torch.randn(2, 5, 50), -1)
    last = torch.tensor([4, 2])
    expected = (lp[0, 4, [3, 7]].exp().sum() + lp[1, 2, [3, 7]].exp().sum()) / 2
    assert cs.concept_prob(lp, last, [3, 7]) == pytest.approx(float(expected))


def test_hierarchical_fit_gives_the_concept_tree(tiny_store):
    pytest.importorskip("workbench.sae.snmf_tree")
    from workbench.sae.io import load_dictionary

    store = tiny_store((SITE,), 256)
    r = api.run("snmf", store=str(store.root), rank=6, tree_ranks="3", n_tokens=200, max_iter=20)
    assert r.tree_ranks == [6, 3] and [n["feature"] for n in r.tree] == [0, 1, 2]
    assert all(n["level"] == 2 and all(0 <= c["feature"] < 6 for c in n["children"]) for n in r.tree)
    assert set(r.tree_labels) == {"2:0", "2:1", "2:2"} and len(r.tree_rows()) == 3
    assert load_dictionary(r.dictionary).cfg.d_sae == 6  # level 1 is the dictionary
    with pytest.raises(ValueError, match="tree_ranks must decrease below rank 6"):
        api.run("snmf", store=str(store.root), rank=6, tree_ranks="8")


def test_pick_chooses_the_separating_unit():
    from workbench.analyses.snmf.steering import pick

    gen = torch.Generator().manual_seed(0)
    pos = [torch.rand(5, 4, generator=gen) for _ in range(6)]
    neg = [torch.rand(7, 4, generator=gen) for _ in range(6)]
    for a in pos:
        a[:, 2] += 1.0  # planted: unit 2 is higher on every concept token
    unit, au = pick(lambda a: a, pos, neg)
    assert unit == 2 and au == 1.0
