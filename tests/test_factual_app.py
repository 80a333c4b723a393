"""The factual-recall page (Streamlit AppTest): a traced fact's heat-maps, and a typed fact's check."""

from pathlib import Path

from workbench import api
from workbench.context import POOL

APP = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"


def _page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    at.switch_page("factual.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_shows_traces_and_refuses_a_subject_not_in_the_prompt(tiny_model, tiny_model_dir):
    POOL.put(tiny_model)
    opts = dict(
        facts="relations", n_facts=1, known_only=False, samples=2, severed=False, max_batch_tokens=512
    )
    result = api.run("factual", model=str(tiny_model_dir), **opts)
    at = _page()
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(titles) == 4  # the fact's traces, AIE curves, heads, suppression
    assert "The capital of France is" in titles[0]
    assert any("site:" in m.value for m in at.markdown)
    assert at.dataframe[0].value.to_dict("records")[0]["state"] == "hidden"
    assert result.rows[0]["prompt"] == "The capital of France is"

    next(t for t in at.text_input if t.label == "Subject").set_value("Rome")
    next(t for t in at.text_input if t.label == "Prompt").set_value("The capital of France is")
    at.button[0].click().run()
    errors = [e.value for e in at.error]
    assert errors == [
        "cannot trace: typed fact: subject 'Rome' is not in its prompt 'The capital of France is'"
    ]
