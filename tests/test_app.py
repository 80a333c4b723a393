"""Headless tests of every app page (Streamlit AppTest) against a prefilled workbench home: a tiny
model's activation store, cached activation-stats and neuron/latent dashboards, and a small SAE.
Values shown on the pages are checked against direct computations, and bad input must show an
error element, never an exception."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import time
import typing
from pathlib import Path

import pytest
import torch

APP = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"  # the router, as installed
TEXT = "The cat sat on the mat. The dog"
TIMEOUT = 180


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    """One prefilled WORKBENCH_HOME shared by this module's tests (built once: ~20 s on 2 cores)."""
    import os

    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    root = tmp_path_factory.mktemp("apphome")
    old = os.environ.get("WORKBENCH_HOME")
    os.environ["WORKBENCH_HOME"] = str(root)
    try:
        from workbench import api
        from workbench.app_pages._demo import prefill

        filled = prefill(str(tiny_model_dir), n_tokens=384, ctx_len=32)
        torch.manual_seed(0)
        sae = StandardSAE(
            StandardSAEConfig(d_in=64, d_sae=96, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
        )
        with torch.no_grad():
            sae.W_enc.normal_()
        sae.save_model(str(root / "dictionaries" / "tiny-sae"))
        filled["dictionary"] = str(root / "dictionaries" / "tiny-sae")
        filled["latent_key"] = api.run(
            "dashboards", store=filled["store"], site="", dictionary=filled["dictionary"]
        ).cache_key
        filled |= {"root": root, "sae": sae, "model_dir": str(tiny_model_dir)}
    finally:
        if old is None:
            os.environ.pop("WORKBENCH_HOME", None)
        else:
            os.environ["WORKBENCH_HOME"] = old
    return filled


@pytest.fixture(autouse=True)
def _use_home(request, workbench_home, monkeypatch):
    if "home" in request.fixturenames:
        monkeypatch.setenv("WORKBENCH_HOME", str(request.getfixturevalue("home")["root"]))


def app(page: str | None = None, **query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    for k, v in query.items():
        at.query_params[k] = v
    if page:
        at.switch_page(f"{page}.py").run()  # relative to the router
    assert not at.exception, [e.value for e in at.exception]
    return at


def until(at, done, seconds: float = 120):
    """Rerun the app until `done(at)` (a background job finished) or fail."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.5)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done(at):
            return at
    raise AssertionError("the background run did not finish")


def click(at, label: str):
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, [e.value for e in at.exception]


def charts(at) -> list:
    return at.get("plotly_chart")


def spans(block: str) -> list[str]:
    """The visible token strings of a token-highlight block."""
    return [html.unescape(t) for t in re.findall(r"<span[^>]*>([^<]*)</span>", block)]


def titles(html: str) -> list[tuple[int, float]]:
    """(position, value) from the hover titles of a token-highlight block."""
    return [(int(p), float(v)) for p, v in re.findall(r'title="(\d+): .*? = ([-+\d.e]+)"', html)]


# --- home ------------------------------------------------------------------------------
def test_home_lists_models_stores_and_results(home):
    at = app()
    assert [s.value for s in at.subheader] == ["Models", "Activation stores", "Cached results"]
    models, stores = at.table[0].value, at.table[1].value
    assert "smollm2-135m" in set(models["key"])
    assert list(stores["path"]) == [home["store"]]
    assert stores["rows"][0] == 384
    shown = {b.key.removeprefix("open-") for b in at.button if b.key.startswith("open-")}
    assert set(home["keys"].values()) | {home["latent_key"]} <= shown
    at.text_input(key="search").set_value("activation-stats").run()
    assert {b.key.removeprefix("open-") for b in at.button if b.key.startswith("open-")} == {
        home["keys"]["activation-stats"]
    }
    at.text_input(key="search").set_value("no-such-thing").run()
    assert not at.button and "No cached results matching" in at.info[0].value


def test_home_reopens_a_result_on_the_analyses_page(home):
    from workbench import api

    at = app()
    key = home["keys"]["activation-stats"]
    at.button(key=f"open-{key}").click().run()
    at.run()  # the switch_page issued by the click lands on the next run
    assert at.title[0].value == "Analyses"
    assert at.selectbox(key="analysis").value == "activation-stats"
    table = at.dataframe[0].value
    expected = api.load(key).summary()
    assert list(table["site"]) == [r["site"] for r in expected]
    assert table["kurtosis"].tolist() == pytest.approx([r["kurtosis"] for r in expected])
    names = list(api.load(key).figures())
    assert len(charts(at)) == min(2, len(names)) and at.button_group[0].value == names[:2]
    at.button_group[0].set_value(names).run()  # pick every figure
    assert len(charts(at)) == len(names)


# --- analyses --------------------------------------------------------------------------
def test_analysis_form_runs_in_background_and_shows_figures(home):
    from workbench import api

    at = app("analyses", analysis="activation-stats")
    assert at.selectbox(key="analysis").value == "activation-stats"
    at.text_input(key="field:activation-stats:store").set_value(home["store"])
    at.number_input(key="field:activation-stats:fire_threshold").set_value(0.05)
    click(at, "Run")
    until(at, lambda a: not a.get("progress") and len(api.cached("activation-stats")) == 2)
    new = api.run("activation-stats", store=home["store"], fire_threshold=0.05)
    assert at.selectbox(key="result").value == new.cache_key
    assert at.dataframe[0].value["dead_frac"].tolist() == pytest.approx(
        [r["dead_frac"] for r in new.summary()]
    )
    assert len(charts(at)) == min(2, len(new.figures())) > 0


def test_analysis_failed_run_shows_error(home):
    at = app("analyses", analysis="activation-stats")
    at.text_input(key="field:activation-stats:store").set_value(str(home["root"] / "no-such-store"))
    click(at, "Run")
    until(at, lambda a: bool(a.error))
    assert "no activation store" in at.error[0].value
    assert not at.exception


def test_every_registered_analysis_has_a_form(home):
    from workbench import api

    at = app("analyses")
    for name in [a["name"] for a in api.list_analyses()]:
        at.selectbox(key="analysis").set_value(name).run()
        assert not at.exception, name
        fields = api.config_fields(name)
        keys = {w.key for w in [*at.text_input, *at.number_input, *at.checkbox, *at.selectbox]}
        assert {f"field:{name}:{f['name']}" for f in fields} <= keys, name
        hints = typing.get_type_hints(type(api.make_config(name)))
        for f in fields:  # a field with fixed values (Literal[...]) is a selectbox of exactly those
            if typing.get_origin(hints[f["name"]]) is typing.Literal:
                box = at.selectbox(key=f"field:{name}:{f['name']}")
                assert box.options == [str(c) for c in typing.get_args(hints[f["name"]])], f["name"]


@dataclasses.dataclass(frozen=True)
class ChoiceConfig:
    mode: typing.Literal["fast", "exact"] = "exact"
    """How to compute."""
    n: int = 3


@pytest.fixture
def choice_analysis(monkeypatch):
    """A planted analysis with a Literal field, registered for one test only."""
    from workbench import analysis

    spec = analysis.AnalysisSpec(
        "zz-choices", 1, ChoiceConfig, analysis.Result, lambda cfg, ctx: None, "Planted."
    )
    analysis.discover()
    monkeypatch.setitem(analysis._REGISTRY, "zz-choices", spec)
    rows = [{"name": s.name, "version": s.version, "doc": s.doc} for s in analysis.all_specs()]
    monkeypatch.setattr(analysis, "listing", lambda: rows)  # not the on-disk listing of the shipped files
    return spec


def test_fixed_choice_fields_are_selectboxes_prefilled_from_the_url(home, choice_analysis):
    at = app("analyses", analysis="zz-choices", mode="fast", n="5")
    box = at.selectbox(key="field:zz-choices:mode")
    assert (box.options, box.value) == (["fast", "exact"], "fast")
    assert at.number_input(key="field:zz-choices:n").value == 5
    at = app("analyses", analysis="zz-choices", mode="slow")
    assert [e.value for e in at.error] == [
        "URL parameter mode='slow' is not one of fast, exact; showing exact."
    ]
    assert at.selectbox(key="field:zz-choices:mode").value == "exact"


# --- URL parameters --------------------------------------------------------------------
def _expected_url_errors(home) -> list[tuple[str, dict, str]]:
    from workbench import api

    names = [a["name"] for a in api.list_analyses()]
    d_mlp = api.open_store(home["store"]).shape("blocks.0.mlp.hook_post")[-1]
    url = "URL parameter"
    return [
        (
            "analyses",
            {"analysis": "nope"},
            f"{url} analysis='nope' is not one of {', '.join(names)}; showing {names[0]}.",
        ),
        (
            "analyses",
            {"key": "../../etc/passwd"},
            f"{url} key='../../etc/passwd' is not a result key (64 hex digits).",
        ),
        (
            "analyses",
            {"key": "0" * 64},
            "cannot open cached result 000000000000: no cached result 000000000000",
        ),
        (
            "analyses",
            {"analysis": "activation-stats", "fire_threshold": "hot"},
            f"{url} fire_threshold='hot' is not a number; showing 0.0.",
        ),
        (
            "analyses",
            {"analysis": "activation-stats", "n_tokens": "2k"},
            f"{url} n_tokens='2k' is not a whole number; showing 2048.",
        ),
        (
            "analyses",
            {"analysis": "activation-stats", "skip_bos": "maybe"},
            f"{url} skip_bos='maybe' is not true or false; showing True.",
        ),
        ("neuron_explorer", {"layer": "7"}, f"{url} layer='7' is not one of 0, 1; showing 0."),
        ("neuron_explorer", {"layer": "../0"}, f"{url} layer='../0' is not one of 0, 1; showing 0."),
        (
            "neuron_explorer",
            {"neuron": "-3"},
            f"{url} neuron='-3' is out of range (0..{d_mlp - 1}); showing 0.",
        ),
        ("neuron_explorer", {"neuron": "x"}, f"{url} neuron='x' is not a whole number; showing 0."),
        ("feature_explorer", {"latent": "96"}, f"{url} latent='96' is out of range (0..95); showing "),
        ("prompt_lens", {"layer": "one"}, f"{url} layer='one' is not a whole number; showing 0."),
        ("prompt_lens", {"layer": "-1"}, f"{url} layer='-1' is below 0; showing 0."),
    ]


def test_bad_url_parameters_show_one_error_line_and_the_page_carries_on(home):
    """Every query parameter a page reads is checked: one readable error naming it, never a traceback."""
    for page, query, message in _expected_url_errors(home):
        extra = {"model": home["model_dir"], "text": TEXT} if page == "prompt_lens" else {}
        at = app(page, **query, **extra)
        shown = [e.value for e in at.error]
        assert len(shown) == 1 and shown[0].startswith(message), (page, query, shown)
        bad = list(query)[-1]  # the bad one is last
        assert bad not in at.query_params or bad == "key" and "cannot open" in message, (page, query)
    at = app("neuron_explorer", layer="1", neuron="4")  # good values still prefill the page
    assert at.sidebar.selectbox[1].value == 1 and at.number_input(key="neuron").value == 4


# --- prompt lens -----------------------------------------------------------------------
def test_prompt_lens_values_match_the_model(home, tiny_model):
    at = app("prompt_lens", model=home["model_dir"], layer="1", text=TEXT)
    assert not at.error, [e.value for e in at.error]
    at.number_input(key="neuron").set_value(5).run()
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(TEXT))
    expected = cache["blocks.1.mlp.hook_post"][0, :, 5]
    shown = titles(at.html[0].value)
    assert [p for p, _ in shown] == list(range(len(expected)))
    assert [v for _, v in shown] == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-6)
    # next-token table at the last token: probabilities of the model's own softmax
    probs = tiny_model(tiny_model.to_tokens(TEXT))[0, -1].softmax(-1)
    table = at.table[-1].value
    assert table["prob"].tolist() == pytest.approx(probs.topk(10).values.tolist(), abs=1e-5)
    top = at.dataframe[0].value  # at the chosen token (the last one until a click)
    post = cache["blocks.1.mlp.hook_post"][0]
    assert top["neuron"].tolist() == post[-1].abs().topk(10).indices.tolist()  # by |a|, sign kept
    assert top["activation"].tolist() == pytest.approx(post[-1, top["neuron"].tolist()].tolist(), abs=1e-5)
    assert top["page"].tolist()[0] == f"neuron_explorer?layer=1&neuron={top['neuron'].tolist()[0]}"
    tokens = [tiny_model.tokenizer.decode([t]) for t in tiny_model.to_tokens(TEXT)[0]]
    pills = at.button_group(key="pos")
    assert pills.options == tokens and pills.value == len(tokens) - 1
    pills.set_value(2).run()  # click the third token
    top = at.dataframe[0].value
    assert top["neuron"].tolist() == post[2].abs().topk(10).indices.tolist()
    assert at.table[-1].value["prob"].tolist() == pytest.approx(
        tiny_model(tiny_model.to_tokens(TEXT))[0, 2].softmax(-1).topk(10).values.tolist(), abs=1e-5
    )


def test_prompt_lens_colours_by_sae_latent_and_residual_norm(home, tiny_model):
    at = app("prompt_lens", model=home["model_dir"], layer="1", text=TEXT, dictionary=home["dictionary"])
    at.radio(key="mode").set_value("SAE latent").run()
    at.number_input(key="latent").set_value(7).run()
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(TEXT))
    resid = cache["blocks.1.hook_resid_post"][0]
    with torch.no_grad():
        latents = home["sae"].encode(resid)
    assert [v for _, v in titles(at.html[0].value)] == pytest.approx(
        latents[:, 7].tolist(), rel=1e-3, abs=1e-5
    )
    top = at.dataframe[1].value
    assert top["latent"].tolist()[0] == int(latents[-1].argmax())
    assert top["page"].tolist()[0].startswith("feature_explorer?dictionary=%2F")
    assert top["page"].tolist()[0].endswith(f"&latent={int(latents[-1].argmax())}")
    at.radio(key="mode").set_value("residual norm").run()
    norms = [v for _, v in titles(at.html[0].value)]
    assert norms == pytest.approx(resid.norm(dim=-1).tolist(), rel=1e-3)


def test_prompt_lens_opens_live_units_scales_without_bos_and_shows_attention_and_logit_lens(home, tiny_model):
    at = app("prompt_lens", model=home["model_dir"], layer="1", text=TEXT, dictionary=home["dictionary"])
    tokens = tiny_model.to_tokens(TEXT)
    _, cache = tiny_model.run_with_cache(tokens)
    post = cache["blocks.1.mlp.hook_post"][0]
    assert at.number_input(key="neuron").value == int(post[1:].abs().amax(0).argmax())  # not neuron 0
    at.radio(key="mode").set_value("SAE latent").run()
    with torch.no_grad():
        latents = home["sae"].encode(cache["blocks.1.hook_resid_post"][0])
    assert at.number_input(key="latent").value == int(latents[1:].amax(0).argmax())  # a live latent
    at.radio(key="mode").set_value("residual norm").run()
    block = at.html[0].value
    norms = cache["blocks.1.hook_resid_post"][0].norm(dim=-1)
    # the colour scale is the largest non-BOS norm: that token is fully opaque, BOS saturated
    top = int(norms[1:].argmax()) + 1
    styles = re.findall(r"background:rgba\(255,110,0,([\d.]+)\)", block)
    assert float(styles[top]) == 1.0 and float(styles[0]) == 1.0
    assert f"{float(norms[1:].max()):.4g}</span>" in block and "left out of the scale" in block
    # the attention heatmap is the layer's pattern of head 0; the logit lens's last layer is the prediction
    (fig,) = charts(at)
    z = json.loads(fig.proto.spec)["data"][0]["z"]
    expected = cache["blocks.1.attn.hook_pattern"][0, 0]
    assert [v for row in z for v in row] == pytest.approx(expected.flatten().tolist(), abs=1e-4)
    lens_rows = at.dataframe[-1].value
    assert lens_rows["layer"].tolist() == [0, 1]
    first = tiny_model.tokenizer.decode([int(tiny_model(tokens)[0, -1].argmax())])
    assert lens_rows["#1"].tolist()[-1].startswith(repr(first))


def test_prompt_lens_opens_the_unit_a_link_names(home):
    """The explorers link back with ?mode=&neuron= / ?latent=: the page opens on that unit."""
    query = {"model": home["model_dir"], "layer": "1", "text": TEXT, "dictionary": home["dictionary"]}
    at = app("prompt_lens", **query, mode="latent", latent="5")
    assert at.radio(key="mode").value == "SAE latent" and at.number_input(key="latent").value == 5
    at = app("prompt_lens", model=home["model_dir"], layer="1", text=TEXT, mode="neuron", neuron="7")
    assert at.radio(key="mode").value == "MLP neuron" and at.number_input(key="neuron").value == 7
    at = app("prompt_lens", model=home["model_dir"], text=TEXT, mode="neurons")
    assert [e.value for e in at.error] == [
        "URL parameter mode='neurons' is not one of neuron, latent, norm; showing neuron."
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"layer": "9"}, "layer 9 is out of range"),
        ({"model": "no-such-model"}, "model 'no-such-model'"),  # unknown, or offline and not cached
        ({"dictionary": "/no/such/dictionary"}, "no dictionary folder"),
    ],
)
def test_prompt_lens_bad_input_shows_error(home, query, message):
    at = app("prompt_lens", **({"model": home["model_dir"], "text": TEXT} | query))
    assert at.error and message in at.error[0].value
    assert not at.exception


# --- neuron and feature explorers ------------------------------------------------------
def test_neuron_explorer_shows_dashboard_and_jumps_to_neighbours(home):
    from workbench import api

    res = api.load(home["keys"]["dashboards"])
    at = app("neuron_explorer")
    at.number_input(key="neuron").set_value(3).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["density"] == f"{float(res.density[3]):.3%}"
    assert metrics["max activation"] == f"{float(res.max_act[3]):.4g}"
    top = res.latent(3)["top"]
    assert len(top) > 0
    blocks = at.html[0].value.split('<div class="ctx"')[1:]  # one block per context, in order
    assert len(blocks) == len(top)
    assert spans(blocks[0]) == [t.replace("\n", "↵") for t in top[0]["tokens"]]
    assert [v for _, v in titles(blocks[0])] == pytest.approx(top[0]["acts"], rel=1e-3, abs=1e-6)
    assert len(charts(at)) == 1  # the activation histogram
    j, r = res.latent(3)["correlated"][0]  # "jump to neighbours (most correlated neurons)"
    assert at.button(key=f"nb-r-neuron-3-{j}").label == f"#{j} · r {r:.2f}"
    at.button(key=f"nb-r-neuron-3-{j}").click().run()
    assert at.number_input(key="neuron").value == j
    assert at.metric[0].value == f"{float(res.density[j]):.3%}"


def test_neuron_explorer_computes_an_uncached_layer(home):
    at = app("neuron_explorer")
    at.sidebar.selectbox[1].set_value(1).run()
    assert "No cached dashboards result for layer 1" in at.info[0].value
    at.button(key=next(b.key for b in at.button if b.key.startswith("run-"))).click().run()
    until(at, lambda a: bool(a.metric))
    assert not at.error


def test_neuron_explorer_bad_store_shows_error(home):
    at = app("neuron_explorer")
    at.text_input(key="store_path").set_value(str(home["root"] / "missing")).run()
    assert at.error and "no activation store" in at.error[0].value
    at.text_input(key="store_path").set_value("").run()
    at.number_input(key="neuron").set_value(10_000).run()
    assert at.error and "out of range" in at.error[0].value


def test_feature_explorer_lists_and_searches_latents(home):
    from workbench import api

    res = api.load(home["latent_key"])
    at = app("feature_explorer")
    assert "d_sae 96" in at.caption[0].value
    table = at.dataframe[0].value
    live = [r for r in res.table() if r["density"] > 0]
    assert len(table) == len(live)
    assert table["density"].tolist() == sorted((r["density"] for r in live), reverse=True)
    word = live[0]["top_tokens"].split(" | ")[0].strip()
    at.text_input(key="search").set_value(word).run()
    assert 0 < len(at.dataframe[0].value) <= len(live)
    assert all(
        word.lower() in (r.top_tokens + r.top_logits).lower() for r in at.dataframe[0].value.itertuples()
    )
    at.number_input(key="latent").set_value(4).run()
    assert at.metric[1].value == f"{float(res.max_act[4]):.4g}"


def test_feature_explorer_bad_dictionary_shows_error(home):
    at = app("feature_explorer")
    at.text_input(key="dictionary_path").set_value("/no/such/dictionary").run()
    assert at.error and "no dictionary folder" in at.error[0].value
    assert not at.exception


# --- the background runs behind the Run buttons ---------------------------------------
def test_background_job_reports_progress_and_errors(home):
    """The thread behind the Run button: progress callbacks arrive, failures become messages."""
    from workbench.app_pages import _common as ui

    jid = ui.start_job("activation-stats", {"store": home["store"], "fire_threshold": 0.125})
    assert ui.start_job("activation-stats", {"store": home["store"], "fire_threshold": 0.125}) == jid
    deadline = time.time() + 120
    while ui.job(jid).status == "running" and time.time() < deadline:
        time.sleep(0.2)
    job = ui.job(jid)
    assert job.status == "done" and job.key
    # two passes (the firing rule needs each unit's range first) x 2 layers x 2 sites, one shard each
    assert job.total == 8 and job.done == 8 and job.fraction == 1.0
    bad = ui.start_job("activation-stats", {"store": str(home["root"] / "nowhere")})
    while ui.job(bad).status == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert ui.job(bad).status == "failed" and "no activation store" in ui.job(bad).error
