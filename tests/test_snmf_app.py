"""The SNMF page and the steering playground (Streamlit AppTest) on a tiny model's fit."""

from pathlib import Path

from workbench import api
from workbench.context import POOL

APP = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"
SITE = "blocks.1.mlp.hook_post"


def _page(name: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    at.switch_page(name).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_snmf_page_shows_features_contexts_and_projection(tiny_store):
    store = tiny_store((SITE,), 256)
    r = api.run("snmf", store=str(store.root), rank=4, n_tokens=200, max_iter=20, n_top=3)
    at = _page("snmf.py")
    text = " ".join(m.value for m in at.markdown)
    assert f"**4 features** of `{SITE}`" in text and f"Dictionary: `{r.dictionary}`" in text
    # the feature list is the result's table; the first feature's contexts are highlighted spans
    assert at.dataframe[0].value.to_dict("records")[0]["feature"] == 0
    contexts = [m.value for m in at.markdown if m.value.startswith("`") and "<span" in m.value]
    assert len(contexts) == int((r.top_rows[0] >= 0).sum())
    assert f"`{float(r.top_coefs[0, 0]):.3f}`" in contexts[0]
    projection = next(d for d in at.dataframe if list(d.value.columns) == ["promotes", "suppresses"]).value
    assert list(projection["promotes"]) == r.logit_tokens(0, True)
    assert not at.warning  # an MLP site: no warning


def test_steering_playground_side_by_side(tiny_store, tiny_model, tiny_model_dir):
    POOL.put(tiny_model)
    store = tiny_store((SITE,), 256)
    r = api.run("snmf", store=str(store.root), rank=4, n_tokens=200, max_iter=20)
    at = _page("steering.py")
    at.selectbox[0].set_value(r.dictionary)
    at.text_input[0].set_value(str(tiny_model_dir))
    at.select_slider[0].set_value(0.025)
    at.number_input[0].set_value(9)  # out of range: one line, nothing computed
    at.button[0].click().run()
    assert [e.value for e in at.error] == [
        "cannot steer: feature 9 is out of range: this dictionary has 4 features"
    ]
    at.number_input[0].set_value(1)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    # the tiny model's KL saturates near 0.02: 0.025 is reported as not reached, the texts still shown
    text = " ".join(m.value for m in at.markdown)
    assert "Feature **1**" in text and "α =" in text
    codes = [c.value for c in at.code]
    assert len(codes) == 2 and codes[0] != codes[1]
