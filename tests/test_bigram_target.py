"""Bigram target (workbench/bigram.py): counts, the reference back-off, sparse CE, cache, bad input."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import GPT2_TOKENIZER
from transformers import AutoTokenizer

from workbench import bigram
from workbench.bigram import BigramError, BigramModel

DOCS = [
    "The cat sat on the mat. " * 60,
    "A dog ran in the park and the dog sat down. " * 40,
    "Rain fell on the quiet town all night long. " * 30,
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


@pytest.fixture()
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    return str(path)


def _reference_counts(tok) -> tuple[Counter, Counter]:
    """Independent count: per document, ids + EOS, the first token after the start row (= vocab)."""
    pairs, unigrams = Counter(), Counter()
    for text in DOCS:
        ids = tok(text.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for prev, nxt in zip([len(tok), *ids[:-1]], ids):
            pairs[(prev, nxt)] += 1
            unigrams[nxt] += 1
    return pairs, unigrams


def test_counts_equal_a_counter_and_stay_within_documents(tok, corpus):
    model = bigram.count(corpus, tok, len(tok), progress=False)
    pairs, unigrams = _reference_counts(tok)
    rows = torch.repeat_interleave(torch.arange(len(tok) + 1), model.indptr.diff())
    got = Counter({(int(r), int(c)): int(n) for r, c, n in zip(rows, model.indices, model.counts)})
    assert got == pairs
    assert model.n_tokens == sum(unigrams.values())
    assert {int(i): int(model.unigram_counts[i]) for i in model.unigram_counts.nonzero()} == dict(unigrams)
    # no pair runs from one document's EOS into the next document
    assert not any(prev == tok.eos_token_id for prev, _ in got)


def test_backoff_sums_to_one_for_seen_unseen_and_unseen_unigram_contexts(tok, corpus):
    model = bigram.count(corpus, tok, len(tok), progress=False)
    seen = tok(" cat", add_special_tokens=False)["input_ids"][0]
    unseen_context = tok.eos_token_id  # a unigram (ends every document) but never followed by a token
    never_seen = tok(" zebra", add_special_tokens=False)["input_ids"][0]
    assert model.unigram_counts[unseen_context] > 0 and model.unigram_counts[never_seen] == 0
    prevs = torch.tensor([seen, unseen_context, never_seen, model.start])
    assert model.seen(prevs).tolist() == [True, False, False, True]
    everything = torch.arange(len(tok))
    for p in prevs:
        total = model.prob(p.repeat(len(tok)), everything).double().sum()
        assert total == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(model.dense(prevs).sum(1), torch.ones(4))
    # unseen contexts get the unigram; the seen one its MLE row
    torch.testing.assert_close(model.dense(prevs[1:3]), model.unigram.repeat(2, 1))
    sat = tok(" sat", add_special_tokens=False)["input_ids"][0]
    pairs, _ = _reference_counts(tok)
    row_total = sum(n for (p, _), n in pairs.items() if p == seen)
    assert float(model.prob(torch.tensor([seen]), torch.tensor([sat]))) == pytest.approx(
        pairs[(seen, sat)] / row_total
    )


def test_empty_counts_fall_back_to_uniform():
    model = BigramModel.from_pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), vocab_size=7)
    torch.testing.assert_close(model.dense(torch.tensor([3])), torch.full((1, 7), 1 / 7))


def test_surprisal_is_nats_and_infinite_without_smoothing(tok, corpus):
    model = bigram.count(corpus, tok, len(tok), progress=False)
    cat, sat = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" cat", " sat"))
    prev, nxt = torch.tensor([cat, cat]), torch.tensor([sat, cat])  # " cat cat" never occurs
    s = model.surprisal(prev, nxt)
    assert float(s[0]) == pytest.approx(-np.log(float(model.prob(prev[:1], nxt[:1]))), rel=1e-6)
    assert torch.isinf(s[1])


def test_cross_entropy_equals_the_dense_computation(tok, corpus):
    model = bigram.count(corpus, tok, len(tok), progress=False)
    torch.manual_seed(0)
    ids = torch.tensor(tok(DOCS[1][:200] + " zebra", add_special_tokens=False)["input_ids"])
    prev = torch.cat([ids, torch.tensor([model.start, tok.eos_token_id])])
    log_q = torch.randn(len(prev), len(tok)).log_softmax(-1).requires_grad_()
    sparse = model.cross_entropy(prev, log_q)
    dense = -(model.dense(prev) * log_q).sum(1)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-4)
    (grad_sparse,) = torch.autograd.grad(sparse.sum(), log_q)
    torch.testing.assert_close(grad_sparse, -model.dense(prev))


def test_cross_entropy_refuses_a_wrong_width(tok, corpus):
    model = bigram.count(corpus, tok, len(tok), progress=False)
    with pytest.raises(BigramError, match=r"log_q has shape \(2, 10\); expected \(2, 50257\)"):
        model.cross_entropy(torch.tensor([1, 2]), torch.zeros(2, 10))


def test_second_call_is_a_cache_load_with_identical_arrays(tok, corpus, monkeypatch):
    first = bigram.bigram_model(corpus, tok, len(tok), progress=False)
    monkeypatch.setattr(bigram, "count", lambda *a, **k: pytest.fail("counted again"))
    second = bigram.bigram_model(corpus, tok, len(tok), progress=False)
    for name, array in first.tensors().items():
        assert torch.equal(array, second.tensors()[name]), name


def test_a_too_small_corpus_is_one_line(tok, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("The cat sat on the mat. " * 20)
    n = len(tok(("The cat sat on the mat. " * 20).strip(), add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(BigramError) as err:
        bigram.bigram_model(str(path), tok, len(tok), progress=False)
    assert str(err.value) == f"corpus has {n} tokens; bigram estimates need at least {bigram.MIN_TOKENS}"


def test_contexts_map_bos_and_eos_to_the_start_row(tok, corpus):
    model = bigram.count(corpus, tok, len(tok), progress=False)
    ids = torch.tensor([5, tok.eos_token_id, 7])
    assert model.contexts(ids, [tok.bos_token_id, tok.eos_token_id]).tolist() == [5, model.start, 7]


def test_joined_sources_count_as_the_sum_of_their_parts(tok, corpus, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": t.strip()}) for t in DOCS[::-1]))
    a = bigram.count(corpus, tok, len(tok), progress=False)
    b = bigram.count(str(other), tok, len(tok), progress=False)
    both = bigram.count(f"{corpus},{other}", tok, len(tok), progress=False)
    everything = torch.arange(len(tok))
    for prev in (tok.eos_token_id, a.start, tok(" the", add_special_tokens=False)["input_ids"][0]):
        row = torch.full((len(tok),), prev)
        joined = both.prob(row, everything) * both.row_total[prev]
        parts = a.prob(row, everything) * a.row_total[prev] + b.prob(row, everything) * b.row_total[prev]
        torch.testing.assert_close(joined, parts)
    assert both.n_tokens == a.n_tokens + b.n_tokens


def test_a_missing_source_is_one_line(tok, tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError) as err:
        bigram.bigram_model(missing, tok, len(tok), progress=False)
    assert (
        str(err.value)
        == f"text source '{missing}' not found: pass a .txt/.jsonl/.json/.parquet file or hf:<dataset>"
    )
