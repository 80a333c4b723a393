"""The Bigram subnetworks page (Streamlit AppTest): a cached result's numbers, figures and ablation
table; the empty state."""

import importlib
from pathlib import Path

import torch
from conftest import TINYSTORIES

from workbench import analysis, api, bigram
from workbench.analyses.bigram.result import BigramResult
from workbench.masks import MaskSet, maskable

# the package re-exports the function `evaluate`, which hides the module of that name
ev = importlib.import_module("workbench.analyses.bigram.evaluate")
APP = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"
NAME = "bigram-subnetwork"


def _page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    at.switch_page("bigram.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _cache_a_result(model) -> BigramResult:
    """An evaluated random mask on the tiny model, stored as the registered analysis' cache entry."""
    tok = model.tokenizer
    target = bigram.count(str(TINYSTORIES), tok, model.cfg.d_vocab, progress=False)
    tokens = ev.held_out_tokens(str(TINYSTORIES), tok, 24, "prepend", skip_seqs=0, n_seqs=4)
    gen = torch.Generator().manual_seed(0)
    mask = MaskSet({n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in maskable(model).items()})
    out = ev.evaluate(model, mask, target, tokens, [tok.bos_token_id, tok.eos_token_id])
    result = BigramResult.from_eval(out, model="tiny-llama", held_out="TinyStories sequences 0-3")
    payload, arrays = result.to_payload()
    meta = {"analysis": NAME, "version": analysis.get(NAME).version, "model": "tiny-llama"}
    api.cache().put("ab" * 32, config={"model": "tiny-llama"}, meta=meta, result=payload, arrays=arrays)
    return result


def test_page_shows_a_cached_result(tiny_model):
    result = _cache_a_result(tiny_model)
    at = _page()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Kept weights"] == f"{result.kept_fraction:.3%}"
    assert metrics["Surprisal r with bigram"] == f"{result.r_bigram:.3f}"
    assert metrics["In layer-0 MLP"] == f"{result.first_mlp_share:.1%}"
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(specs) == 5  # kept heat-map, ablation, scatter, alignment, covariance heat-maps
    assert "Kept weights:" in specs[0] and "layer-0 MLP holds" in specs[0]
    table = at.dataframe[0].value.to_dict("records")
    assert [r["variant"] for r in table] == [r["variant"] for r in result.ablation]
    assert table[1]["mean_surprisal"] == result.ablation[1]["mean_surprisal"]
    assert any("TinyStories sequences 0-3" in m.value for m in at.markdown)


def test_page_without_results_says_how_to_make_one():
    at = _page()
    assert at.info[0].value == f"No bigram subnetworks yet: `workbench run {NAME}` trains one."
    assert not at.get("plotly_chart")
