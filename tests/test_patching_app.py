"""The patching page (Streamlit AppTest): maps of every method, and a cell's per-prompt scores."""

from pathlib import Path
from urllib.parse import quote_plus

import pytest

from workbench import api
from workbench.context import POOL

APP = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"


@pytest.fixture
def result(tiny_model, tiny_model_dir):
    POOL.put(tiny_model)
    return api.run("patching", model=str(tiny_model_dir), n_prompts=2, ig_steps=2, seed=1)


def _page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=180)
    at.run()
    at.switch_page("patching.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_shows_the_maps_and_a_cells_per_prompt_scores(result):
    at = _page()
    assert len(at.get("plotly_chart")) == 1
    assert [r["method"] for r in at.dataframe[0].value.to_dict("records")] == ["AP", "AtP", "RelP", "IG"]
    next(r for r in at.radio if r.label == "Component").set_value("attn_out").run()
    layer = next(n for n in at.number_input if n.label == "Layer")
    layer.set_value(1).run()
    pos = next(n for n in at.number_input if n.label == "Position")
    pos.set_value(len(result.labels) - 1).run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[-1].value.to_dict("records")
    want = result.per_prompt("atp", "attn_out", 1, len(result.labels) - 1)
    assert [row["prompt"] for row in table] == [w["prompt"] for w in want]
    assert [row["atp"] for row in table] == [round(w["score"], 5) for w in want]


def test_bad_options_show_one_error(result):
    at = _page()
    next(t for t in at.text_input if t.label == "Task").set_value("missing.csv")
    next(b for b in at.button if b.label == "Run").click().run()
    assert not at.exception
    assert any("task file missing.csv does not exist" in e.value for e in at.error)


def test_page_shows_the_top_latents_with_explorer_links(tiny_model, tiny_model_dir, tmp_path):
    from workbench.sae.archs import ArchSpec, build
    from workbench.sae.io import save_dictionary

    site = "blocks.0.hook_resid_post"
    folder = save_dictionary(
        build(ArchSpec("topk", 64, 32, k=8), {"hook_name": site}, seed=1), tmp_path / "d"
    )
    POOL.put(tiny_model)
    res = api.run(
        "patching",
        model=str(tiny_model_dir),
        n_prompts=2,
        methods="atp,relp",
        dictionary=str(folder),
        feature_top_k=4,
    )
    at = _page()
    assert any(s.value == "Dictionary features" for s in at.subheader)
    table = at.dataframe[-1].value.to_dict("records")
    assert table == res.feature_table()
    assert [r["latent"] for r in table[:5]] == [str(t["latent"]) for t in res.feature_top["atp"]] + ["error"]
    assert (
        table[0]["url"]
        == f"feature_explorer?dictionary={quote_plus(str(folder))}&latent={table[0]['latent']}"
    )
    assert len(at.get("plotly_chart")) == 2  # the maps and the top-latents bars
