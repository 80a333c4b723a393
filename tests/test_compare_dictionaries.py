"""compare-dictionaries: the Pareto frontier on planted points, readable names, planted dictionaries
scored by sae-eval end to end, and the app page."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import plant_identity

from workbench.analyses.compare_dictionaries import pareto, readable_name, si


def test_pareto_frontier_on_planted_points():
    points = [(1.0, 0.5), (2.0, 0.3), (3.0, 0.4), (2.0, 0.3), (5.0, 0.1), (5.0, 0.2), (0.5, 0.9)]
    # (3, .4) is beaten by (2, .3); (5, .2) by (5, .1); equal points do not dominate each other
    assert pareto(points) == [True, True, False, True, True, False, True]
    assert pareto([]) == [] and pareto([(1.0, 1.0)]) == [True]


def test_readable_names():
    row = {"arch": "topk", "d_sae": 4608, "k": 32, "tokens": 1_000_000, "site": "blocks.15.hook_resid_post"}
    assert readable_name(row) == "TopK SAE · 4,608 latents · k=32 · 1M tokens · blocks.15.hook_resid_post"
    row = {"arch": "standard", "d_sae": 512, "lam": 5.0, "tokens": 16384, "site": "blocks.1.hook_resid_post"}
    assert readable_name(row) == "ReLU SAE · 512 latents · λ=5 · 16.4k tokens · blocks.1.hook_resid_post"
    row = {
        "arch": "transcoder",
        "d_sae": 64,
        "k": 4,
        "site": "blocks.1.mlp.hook_in",
        "site_out": "blocks.1.hook_mlp_out",
    }
    assert (
        readable_name(row)
        == "transcoder · 64 latents · k=4 · ? tokens · blocks.1.mlp.hook_in → blocks.1.hook_mlp_out"
    )
    assert [si(n) for n in (300, 16384, 2_500_000, None)] == ["300", "16.4k", "2.5M", "?"]


def _save(sae, home, name: str) -> str:
    path = home / "dictionaries" / name
    sae.save_model(str(path))
    return str(path)


def _identity(d: int, hook_name: str, decoder_scale: float = 1.0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = plant_identity(
        StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, metadata=SAEMetadata(hook_name=hook_name)))
    )
    with torch.no_grad():
        sae.W_dec.mul_(decoder_scale)
    return sae


def test_planted_dictionaries_compared_end_to_end_and_on_the_page(tiny_store, workbench_home):
    from streamlit.testing.v1 import AppTest

    from workbench import api

    store = tiny_store(("blocks.0.hook_resid_post",), 128)
    d = store.shape("blocks.0.hook_resid_post")[0]
    perfect = _save(_identity(d, "blocks.0.hook_resid_post"), workbench_home, "perfect")
    # the same L0 with a half-size decoder: worse FVU, so off the frontier; named by an alias
    worse = _save(_identity(d, "blocks.0.hook_out", 0.5), workbench_home, "worse")
    ev = api.run("sae-eval", dictionary=f"{perfect},{worse}", store=str(store.root), n_seqs=2)
    by_path = {str(Path(r["dictionary"]).resolve()): r for r in ev.table}
    res = api.run("compare-dictionaries", site="blocks.0.hook_out")  # an alias selects the site
    rows = {r["path"]: r for r in res.rows}
    assert set(rows) == {perfect, worse}
    for path, row in rows.items():
        assert row["site"] == "blocks.0.hook_resid_post" and row["source"] == "sae-eval (held_out rows)"
        for ours, theirs in (
            ("l0", "l0"),
            ("fvu", "fvu"),
            ("ce_loss_score", "ce_loss_score"),
            ("frac_dead", "frac_dead"),
        ):
            theirs = (
                "frac_never_fired" if theirs == "frac_dead" and "frac_dead" not in ev.table[0] else theirs
            )
            assert row[ours] == pytest.approx(by_path[str(Path(path).resolve())][theirs])
    assert rows[perfect]["pareto"] and not rows[worse]["pareto"]
    assert (
        rows[perfect]["name"] == f"ReLU SAE · {2 * d} latents · ? tokens · blocks.0.hook_resid_post · perfect"
    )
    # a new dictionary is a new key (the comparison is never stale)
    _save(_identity(d, "blocks.0.hook_resid_post", 0.9), workbench_home, "third")
    again = api.run("compare-dictionaries", site="blocks.0.hook_out")
    assert again.cache_key != res.cache_key and len(again.rows) == 3
    assert {r["source"] for r in again.rows} == {"sae-eval (held_out rows)", "not evaluated"}

    app = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"
    at = AppTest.from_file(str(app), default_timeout=180)
    at.run()
    at.switch_page("dictionaries.py").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert sorted(table["name"].tolist()) == sorted(r["name"] for r in again.rows)
    assert table["frontier"].tolist().count("★") == sum(r["pareto"] for r in again.rows)
    assert len(at.get("plotly_chart")) == 3


def test_a_trained_dictionary_is_named_from_its_training_run(tiny_store):
    from workbench import api

    store = tiny_store(("blocks.1.mlp.hook_post",), 256)
    opts = {"d_sae": 64, "k": 4, "steps": 10, "batch_size": 64, "eval_tokens": 128}
    trained = api.run("train-sae", store=str(store.root), site="blocks.1.mlp.hook_post", **opts)
    (row,) = api.run("compare-dictionaries").rows
    assert (
        row["name"] == f"TopK SAE · 64 latents · k=4 · {si(trained.tokens)} tokens · blocks.1.mlp.hook_post"
    )
    assert row["source"] == "train-sae (held_out rows)" and row["ce_loss_score"] is None
    assert (row["l0"], row["fvu"]) == (trained.final["l0"], trained.final["fvu"]) and row["pareto"]
