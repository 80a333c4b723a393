"""Every registered analysis runs on a tiny model, round-trips through the cache and renders figures.

A new analysis must add an example here (the first test fails until it does).
"""

import json
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch

from workbench import analysis, api
from workbench.context import POOL

SITE = "blocks.1.mlp.hook_post"

EXAMPLES = {
    "activation-stats": lambda env: {"store": env.store},
    "dashboards": lambda env: {
        "store": env.store,
        "site": SITE,
        "model": env.model,
        "n_top": 4,
        "latents": 16,
    },
    "sparsity": lambda env: {
        "store": env.store,
        "model": env.model,
        "data": env.data,
        "held_tokens": 128,
        "cett_tokens": 64,
        "search_iters": 4,
        "topk_ks": "0.1,1",
        "batch_size": 2,
        "ctx_len": 32,
    },
    "train-sae": lambda env: {
        "store": env.store,
        "site": SITE,
        "d_sae": 64,
        "k": 4,
        "steps": 10,
        "batch_size": 64,
        "eval_tokens": 128,
        "checkpoint_every": 5,
    },
    "sae-eval": lambda env: {
        "dictionary": env.dictionary(),
        "store": env.store,
        "model": env.model,
        "n_tokens": 256,
        "n_seqs": 2,
        "batch_size": 2,
    },
    "patching": lambda env: {
        "model": env.model,
        "n_prompts": 2,
        "ig_steps": 2,
        "dictionary": env.dictionary(),  # a trained SAE: feature attribution rides along
        "feature_top_k": 5,
    },
    # a random tiny model knows no fact: trace two templated facts anyway
    "factual": lambda env: {
        "model": env.model,
        "facts": "relations",
        "n_facts": 2,
        "known_only": False,
        "samples": 2,
        "max_batch_tokens": 512,
    },
    # trains a mask for 3 steps on WikiText (bigram counts of the same text), then evaluates it
    "bigram-subnetwork": lambda env: {
        "model": env.model,
        "data": env.data,
        "steps": 3,
        "batch_size": 2,
        "ctx_len": 16,
        "train_seqs": 8,
        "eval_seqs": 2,
        "checkpoint_every": 2,
    },
    # train one dictionary first (its path is truthy), then compare the dictionaries on its site
    "compare-dictionaries": lambda env: {"site": env.dictionary() and SITE},
    "snmf": lambda env: {"store": env.store, "site": SITE, "rank": 4, "n_tokens": 200, "max_iter": 20},
    # the SNMF fit and a trained SAE on the same site; the tiny model's KL saturates near 0.02
    "snmf-steering": lambda env: {
        "snmf": api.run("snmf", **EXAMPLES["snmf"](env)).dictionary,
        "dictionary": env.dictionary(),
        "model": env.model,
        "concepts": "food",
        "targets": "0.002,0.005",
        "generate_kl": 0.005,
        "n_new": 3,
    },
}


@pytest.fixture
def env(tiny_model, tiny_model_dir, wikitext):
    POOL.put(tiny_model)
    store = api.capture(
        model=str(tiny_model_dir),
        data=wikitext,
        n_tokens=256,
        ctx_len=32,
        batch_size=2,
        sites=(SITE, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
        progress=False,
    )
    box = SimpleNamespace(store=str(store.root), model=str(tiny_model_dir), data=wikitext)
    box.dictionary = lambda: api.run("train-sae", **EXAMPLES["train-sae"](box)).dictionary
    return box


def test_every_registered_analysis_has_an_example():
    assert set(EXAMPLES) == {s.name for s in analysis.all_specs()}


INPUT_NAMES = {"store": "store", "model": "model", "data": "data", "dictionary": "dictionary"}


@pytest.mark.parametrize("spec", analysis.all_specs(), ids=lambda s: s.name)
def test_inputs_declared_and_choices_offered(spec):
    """Inputs are declared (keys never guess by name), every declared kind is known, and every
    Literal field is a choice in the CLI and the app's form, with an allowed default."""
    import dataclasses
    import typing

    import click

    from workbench import checks, inputs
    from workbench.cli import _options_from

    declared = inputs.declared_inputs(spec.config_cls)
    for f in dataclasses.fields(spec.config_cls):
        if f.name in INPUT_NAMES and "captured" not in f.metadata:
            assert declared.get(f.name) == INPUT_NAMES[f.name], (
                f"{spec.name}.{f.name} is not a declared input"
            )
    assert set(declared.values()) <= set(inputs._KINDS), declared
    hints = typing.get_type_hints(spec.config_cls)
    form = {row["name"]: row for row in api.config_fields(spec.name)}
    options = {o.name: o for o in _options_from(spec.config_cls)}
    defaults = spec.make_config()
    for name, hint in hints.items():
        allowed = checks.choices(hint)
        if allowed:
            assert getattr(defaults, name) in allowed
            assert form[name]["choices"] == list(allowed)
            assert isinstance(options[name].type, click.Choice) and list(options[name].type.choices) == list(
                allowed
            )


def _same_payload(a, b) -> None:
    (plain_a, arrays_a), (plain_b, arrays_b) = a.to_payload(), b.to_payload()
    assert json.loads(json.dumps(plain_a, default=str)) == json.loads(json.dumps(plain_b, default=str))
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        assert torch.equal(arrays_a[k], arrays_b[k]), k


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_analysis_conforms(name, env):
    result = api.run(name, **EXAMPLES[name](env))
    loaded = api.load(result.cache_key)
    assert type(loaded) is type(result)
    _same_payload(result, loaded)
    figures = loaded.figures()
    assert figures and all(isinstance(f, go.Figure) for f in figures.values())
    for fig in figures.values():
        fig.to_json()  # renders: every trace serialisable
    assert isinstance(loaded.summary(), list) and loaded.summary()
    assert api.run(name, **EXAMPLES[name](env)).cache_key == result.cache_key  # a cache hit
    example = EXAMPLES[name](env)
    if (
        "store" in example
    ):  # the key comes from declared inputs: another spelling of the store is the same run
        respelled = {**example, "store": example["store"] + "/"}
        assert api.key_for(name, api.make_config(name, **respelled)) == result.cache_key


def test_cli_exports_dashboards_as_neuronpedia_json(env, tmp_path):
    from click.testing import CliRunner

    from workbench.cli import cli

    result = api.run("dashboards", **EXAMPLES["dashboards"](env))
    out = CliRunner().invoke(cli, ["export", result.cache_key[:12], str(tmp_path / "np")])
    assert out.exit_code == 0, out.output
    exported = json.loads((tmp_path / "np" / "batch-0.json").read_text())
    assert exported["features"]  # a SAEDashboard batch folder; schema and content in test_export.py
    stats = api.run("activation-stats", store=env.store)
    refused = CliRunner().invoke(cli, ["export", stats.cache_key[:12], str(tmp_path / "x.json")])
    assert refused.exit_code == 2 and "has no export format" in refused.output
