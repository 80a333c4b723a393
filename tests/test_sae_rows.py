"""The row rule (sae.rows) on planted ground truth: a tiny Llama whose embedding of one common token is
scaled ×300, so every non-BOS row of that token is a massive-norm outlier in the residual stream; the
EOS separators between documents are special tokens; every 20th sequence is held out."""

from __future__ import annotations

import pytest
import torch

from workbench.sae.rows import RowRule, first_span, select_rows, special_token_ids, split_mask

SITE = "blocks.1.hook_resid_post"
CTX = 32
PLANT = 262  # " the" in the GPT-2 tokenizer: frequent in WikiText


@pytest.fixture(scope="module")
def store(wikitext, tmp_path_factory):
    from conftest import make_tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.capture import CaptureConfig, capture
    from workbench.models import load_model

    root = tmp_path_factory.mktemp("massive")
    src = make_tiny_model_dir(root, "llama", seed=2)
    hf = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        hf.model.embed_tokens.weight[PLANT] *= 300
    hf.save_pretrained(root / "m")
    AutoTokenizer.from_pretrained(src).save_pretrained(root / "m")
    model = load_model(str(root / "m"))
    cfg = CaptureConfig(model=str(root / "m"), sites=(SITE,), data=wikitext, n_tokens=2560, ctx_len=CTX)
    return capture(cfg, model=model, out=tmp_path_factory.mktemp("store") / "run", progress=False)


def test_outliers_specials_and_split_match_the_plant(store):
    tok, pos = store.token_ids(), store.positions()
    eos = 50256  # GPT-2's BOS = EOS = the document separator
    assert special_token_ids(store) == [eos]
    seq = torch.arange(store.n_rows) // CTX
    n_seqs = store.n_rows // CTX
    held = (n_seqs - 1 - seq) % 20 == 0
    assert torch.equal(split_mask(store, 20, "held_out"), held) and held[-1] and int(held.sum()) == 4 * CTX
    planted = (tok == PLANT) & (pos != 0)
    special = (tok == eos) | (pos == 0)
    assert planted.sum() > 20 and (special & (pos != 0)).sum() > 0  # separators inside sequences
    for split, rows_in in (("train", ~held), ("held_out", held)):
        rows = select_rows(store, [SITE], RowRule(outlier_factor=5.0, held_out_every=20), split)
        assert torch.equal(rows.keep, rows_in & ~planted & ~special), split
        assert rows.counts == {
            "rows_in_split": int(rows_in.sum()),
            "special_excluded": int((rows_in & special).sum()),
            "outliers_excluded": int((rows_in & planted).sum()),
            "ordinary_rows": int((rows_in & ~planted & ~special).sum()),
        }
        assert torch.equal(rows.all_but_bos, rows_in & (pos != 0))
    norms = store.read(SITE).norm(dim=-1)
    median = float(norms[~special][:: max(1, int((~special).sum()) // 65536)].median())
    assert rows.medians[SITE] == pytest.approx(median)
    assert norms[planted].min() > 20 * median and norms[~planted & ~special].max() < 5 * median
    off = select_rows(store, [SITE], RowRule(outlier_factor=0, held_out_every=0), "all")
    assert off.counts["outliers_excluded"] == 0 and torch.equal(off.keep, ~special)
    ordinary, everything = first_span(off, 100)
    assert int(ordinary.sum()) == 100 and ordinary.nonzero().max() == everything.nonzero().max()


def test_train_sae_leaves_outliers_out_and_scores_both_splits(store):
    """Training never streams a planted row; FVU on all tokens is dominated by them, FVU on ordinary
    tokens is not; sae-eval on the same store finds the held-out split and the same counts."""
    from workbench import api

    res = api.run(
        "train-sae", store=str(store.root), site=SITE, d_sae=128, k=8, batch_size=128, steps=60, lr=3e-3
    )
    tok, pos = store.token_ids(), store.positions()
    planted = (tok == PLANT) & (pos != 0)
    held = split_mask(store, 20, "held_out")
    assert res.rows["train"]["outliers_excluded"] == int((planted & ~held).sum())
    assert res.rows["held_out"]["outliers_excluded"] == int((planted & held).sum())
    assert res.final["split"] == "held_out" and res.final_train["split"] == "train"
    assert res.final["n_tokens"] == res.rows["held_out"]["ordinary_rows"]
    for final in (res.final, res.final_train):
        assert final["fvu_all_but_bos"] > final["fvu"] + 0.1, final  # the unlearnt planted rows count there
    ev = api.run("sae-eval", dictionary=res.dictionary, store=str(store.root), n_seqs=2).table[0]
    assert ev["split"] == "held_out" and ev["n_tokens"] == res.final["n_tokens"]
    assert ev["fvu"] == pytest.approx(res.final["fvu"], rel=1e-4)
    ordinary = held & ~planted & (tok != 50256)
    span = torch.arange(store.n_rows) <= ordinary.nonzero().max()  # scored rows end at the last ordinary one
    assert (
        ev["outliers_excluded"] == int((planted & held & span).sum()) > 0 and ev["splice_outliers_kept"] > 0
    )
    train = api.run("sae-eval", dictionary=res.dictionary, store=str(store.root), n_seqs=0, split="train")
    assert train.table[0]["split"] == "train" and train.table[0]["fvu"] == pytest.approx(
        res.final_train["fvu"], rel=1e-4
    )


def test_passes_warning_counts_whole_batch_passes():
    """One pass of whole batches (the stream drops each buffer's partial batch) is not "part of the
    store never seen"; fewer tokens, or more than `many` passes, are one line each."""
    from workbench.sae.recipe import passes_warning

    assert passes_warning(954_368, 972_026, 20, epoch_tokens=954_368) is None
    assert passes_warning(2 * 954_368, 972_026, 20, epoch_tokens=954_368) is None
    short = passes_warning(262_144, 972_026, 20, epoch_tokens=954_368)
    assert short.startswith("train-sae: 262,144 training tokens are 0.27 passes over the store's 972,026")
    many = passes_warning(25 * 972_026, 972_026, 20, epoch_tokens=954_368)
    assert "are 25 passes" in many and "may memorise" in many
