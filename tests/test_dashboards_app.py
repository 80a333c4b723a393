"""The feature and neuron pages (Streamlit AppTest): signed units show their negative contexts and
the firing rule, each example its activation, neighbour buttons their id and r/cos, URL parameters
open a unit, the "own text" box matches the model, and a dictionary opens on its training store."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import torch

APP = Path(__file__).resolve().parents[1] / "app_pages" / "main.py"
MLP, RESID = "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"
TEXT = "The cat sat on the mat. The dog"


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model, tiny_model_dir, wikitext):
    """A home with two stores (the dictionary's training store first, a newer one second), neuron
    dashboards on the first, and a random SAE whose cfg.json names its training store."""
    import os

    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from workbench import api
    from workbench.context import POOL

    root = tmp_path_factory.mktemp("dashhome")
    old = os.environ.get("WORKBENCH_HOME")
    os.environ["WORKBENCH_HOME"] = str(root)
    try:
        POOL.put(tiny_model)
        common = dict(
            model=str(tiny_model_dir), data=wikitext, ctx_len=32, sites=(MLP, RESID), progress=False
        )
        trained = api.capture(n_tokens=256, **common)
        newer = api.capture(n_tokens=320, **common)
        neurons = api.run("dashboards", store=str(trained.root), site=MLP, dictionary="")
        torch.manual_seed(0)
        meta = SAEMetadata(hook_name=RESID)
        sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=48, metadata=meta))
        with torch.no_grad():
            sae.W_enc.normal_()
        folder = root / "dictionaries" / "tiny-sae"
        sae.save_model(str(folder))
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["metadata"]["workbench"] = {"store": trained.root.name, "processing": "raw"}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        api.run("dashboards", store=str(trained.root), site="", dictionary=str(folder))
    finally:
        if old is None:
            os.environ.pop("WORKBENCH_HOME", None)
        else:
            os.environ["WORKBENCH_HOME"] = old
    return {"root": root, "trained": str(trained.root), "newer": str(newer.root), "neurons": neurons.cache_key,
            "sae": sae, "dictionary": str(folder), "model": str(tiny_model_dir)}  # fmt: skip


@pytest.fixture(autouse=True)
def _use_home(request, workbench_home, monkeypatch):
    if "home" in request.fixturenames:
        monkeypatch.setenv("WORKBENCH_HOME", str(request.getfixturevalue("home")["root"]))


def app(page: str, **query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=240)
    at.run()
    for k, v in query.items():
        at.query_params[k] = v
    at.switch_page(f"{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def values(block: str) -> list[float]:
    """Hover values of a token-highlight block."""
    return [float(v) for v in re.findall(r'title="\d+: .*? = ([-+\d.e]+)"', block)]


def example_values(block: str) -> list[float]:
    """The activation printed before each example."""
    return [float(html.unescape(v)) for v in re.findall(r"<code[^>]*>([^<]*)</code>", block)]


def test_neuron_page_signed_contexts_rule_neighbours_and_url(home):
    from workbench import api

    res = api.load(home["neurons"])
    at = app("neuron_explorer", store=home["trained"], layer="0", neuron="5")
    assert at.number_input(key="neuron").value == 5
    d = res.latent(5)
    assert d["signed"] and [s.value for s in at.subheader][:2] == [
        "Max-activating contexts",
        "Most negative contexts",
    ]
    top, neg = at.html[0].value, at.html[1].value
    assert example_values(top) == pytest.approx([c["act"] for c in d["top"]], rel=1e-3)
    assert example_values(neg) == pytest.approx([c["act"] for c in d["negative"]], rel=1e-3)
    assert all(v < 0 for v in example_values(neg))
    captions = " ".join(c.value for c in at.caption)
    assert "Firing rule: " + res.firing_rule in captions
    assert f"fires when |a| > {d['fire_threshold']:.4g}" in captions
    assert "diag(γ_final)" in captions
    j, r = d["correlated"][0]
    button = at.button(key=f"nb-r-neuron-5-{j}")
    assert button.label == f"#{j} · r {r:.2f}"
    button.click().run()
    assert at.number_input(key="neuron").value == j and at.query_params["neuron"] == str(j)
    at.query_params["neuron"] = "9"  # a link with a new neuron opens it in the same session
    at.run()
    assert at.number_input(key="neuron").value == 9


def test_own_text_box_matches_the_model(home, tiny_model):
    at = app("neuron_explorer", store=home["trained"], layer="0", neuron="5")
    at.text_area(key="own-text-neuron").set_value(TEXT)
    at.button[[b.label for b in at.button].index("Run the model on it")].click().run()
    assert not at.error, [e.value for e in at.error]
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(TEXT))
    expected = cache[MLP][0, :, 5]
    shown = values(at.html[-1].value)
    assert shown == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-6)
    link = at.get("page_link")[0].proto  # and back to the prompt lens on the same unit and text
    assert link.page.endswith("prompt_lens") or link.page.endswith("prompt_lens.py"), link.page
    assert parse_qs(link.query_string) == {"model": [home["model"]], "layer": ["0"], "mode": ["neuron"],
                                           "neuron": ["5"], "text": [TEXT]}  # fmt: skip


def test_feature_page_opens_the_training_store_and_tests_text(home, tiny_model):
    at = app("feature_explorer", dictionary=home["dictionary"], latent="3")
    assert at.sidebar.selectbox[1].value == home["trained"]  # not the newer store
    assert any("On the store it was trained on" in c.value for c in at.caption)
    assert at.number_input(key="latent").value == 3
    at.text_area(key="own-text-latent").set_value(TEXT)
    at.button[[b.label for b in at.button].index("Run the model on it")].click().run()
    assert not at.error, [e.value for e in at.error]
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(TEXT))
    expected = home["sae"].encode(cache[RESID][0])[:, 3]
    assert values(at.html[-1].value) == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-6)


def test_unit_activations_errors(home, tiny_model):
    from workbench import api

    with pytest.raises(api.LensError, match="^type some text first$"):
        api.unit_activations(tiny_model, "  ", MLP, 0)
    with pytest.raises(
        api.LensError, match=r"^latent 48 is out of range: this dictionary has latents 0\.\.47$"
    ):
        api.unit_activations(tiny_model, TEXT, RESID, 48, dictionary=home["dictionary"])
    with pytest.raises(
        api.LensError, match=r"^unit 128 is out of range: blocks.0.mlp.hook_post has units 0\.\.127$"
    ):
        api.unit_activations(tiny_model, TEXT, MLP, 128)
    assert api.dictionary_store(home["dictionary"]) == home["trained"]
