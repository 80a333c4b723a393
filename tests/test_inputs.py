"""Declared inputs: keys from what a run reads (canonical paths, content fingerprints), and a store
that supersedes the capture options it was made with."""

import dataclasses
import json
import os
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

import workbench as wb
from workbench import api, inputs
from workbench.cli import cli


@dataclass(frozen=True)
class _Cfg:
    blob: str = inputs.input_field("blob-test")
    other: str = inputs.input_field("blob-test")
    plain: int = 3


def test_declared_inputs_fingerprint_only_what_is_set(tmp_path):
    inputs.register_kind("blob-test", lambda v: f"fp:{v}", lambda v: v.upper())
    cfg = _Cfg(blob="a")
    assert inputs.declared_inputs(_Cfg) == {"blob": "blob-test", "other": "blob-test"}
    assert inputs.fingerprints(cfg) == {"blob": "fp:a"}
    assert inputs.canonical_config(cfg) == {"blob": "A", "other": "", "plain": 3}
    assert dataclasses.fields(_Cfg)[0].metadata["input"] == "blob-test"


def test_unknown_kind_is_named():
    @dataclass(frozen=True)
    class Bad:
        x: str = inputs.input_field("no-such-kind", "v")

    with pytest.raises(KeyError, match="unknown input kind 'no-such-kind'"):
        inputs.fingerprints(Bad())


def test_canonical_path_spellings(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spellings = [str(folder), str(folder) + "/", "runs/a", "./runs/a/", "runs/../runs/a"]
    assert {inputs.canonical_path(s) for s in spellings} == {str(folder.resolve())}


@pytest.fixture
def store(tiny_store):
    return tiny_store(("blocks.*.mlp.hook_post",), n_tokens=128)


def test_one_key_for_every_spelling_of_a_store_and_for_ignored_options(store, tmp_path, monkeypatch):
    monkeypatch.chdir(store.root.parent)
    rel = os.path.relpath(store.root)
    key = api.key_for("activation-stats", api.make_config("activation-stats", store=str(store.root)))
    for spelling in (str(store.root) + "/", rel, "./" + rel + "/"):
        assert api.key_for("activation-stats", api.make_config("activation-stats", store=spelling)) == key
    # capture options equal to the store's own values change nothing
    same = dict(model=store.config["model"], n_tokens=128, ctx_len=32, data=store.config["data"])
    assert api.key_for("activation-stats", api.make_config("activation-stats", store=rel, **same)) == key
    # a changed option the run does read still changes the key
    other = api.make_config("activation-stats", store=rel, fire_threshold=0.5)
    assert api.key_for("activation-stats", other) != key


def test_option_conflicting_with_the_store_is_an_error(store):
    model = store.config["model"]
    with pytest.raises(inputs.InputConflictError) as err:
        wb.run("activation-stats", store=str(store.root), model="gemma-3-270m")
    assert str(err.value) == (
        f"--model gemma-3-270m conflicts with the store (captured from {model}); "
        "drop --model or pick another store"
    )
    with pytest.raises(inputs.InputConflictError, match=r"--n-tokens 4096 conflicts .*n_tokens=128\)"):
        wb.run("activation-stats", store=str(store.root), n_tokens=4096)
    out = CliRunner().invoke(
        cli, ["run", "activation-stats", "--store", str(store.root), "--model", "gemma-3-270m"]
    )
    assert out.exit_code == 2
    assert out.output.strip() == (
        f"error: --model gemma-3-270m conflicts with the store (captured from {model}); "
        "drop --model or pick another store"
    )


def test_typed_option_equal_to_the_default_still_conflicts(store, tiny_model_dir):
    """On the command line, `--model smollm2-135m` is the user's word even though it is the default."""
    out = CliRunner().invoke(
        cli,
        ["run", "activation-stats", "--store", str(store.root), "--model", "smollm2-135m", "--ctx-len", "32"],
    )
    assert out.exit_code == 2
    assert out.output.strip() == (
        f"error: --model smollm2-135m conflicts with the store (captured from {tiny_model_dir}); "
        "drop --model or pick another store"
    )
    same = CliRunner().invoke(
        cli, ["run", "activation-stats", "--store", str(store.root), "--ctx-len", "32", "--json"]
    )
    assert same.exit_code == 0, same.output  # a typed value equal to the store's is fine


def test_result_records_the_store_and_the_model_it_was_captured_from(store):
    result = wb.run("activation-stats", store=str(store.root) + "/")
    entry = api.cache().get(result.cache_key)
    assert entry.meta["model"] == store.config["model"]
    assert entry.meta["store"] == str(store.root.resolve())
    config = json.loads((api.cache().entry_dir(result.cache_key) / "config.json").read_text())
    assert config["store"] == str(store.root.resolve())
    assert config["model"] == store.config["model"] and config["n_tokens"] == 128 and config["ctx_len"] == 32
