"""The CLI's input checks (before any model loads), the README's --sites example, choices,
discovery of analyses."""

import json
import logging

import pytest
from click.testing import CliRunner

import workbench as wb
from workbench import analysis, models
from workbench.cli import cli
from workbench.context import POOL


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: every check here must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr("workbench.context.load_model", refuse)
    monkeypatch.setattr(POOL, "get", refuse)


def _capture(*args):
    return CliRunner().invoke(cli, ["capture", *args])


def _error(out) -> str:
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    return out.output.strip().splitlines()[-1]


def test_capture_options_checked_before_the_model_loads(no_model_load, tiny_model_dir, wikitext):
    base = ["--model", str(tiny_model_dir), "--data", wikitext]
    assert _error(_capture(*base, "--n-tokens", "0")) == "error: n_tokens must be positive, got 0"
    assert _error(_capture(*base, "--batch-size", "-1")) == "error: batch_size must be positive, got -1"
    assert _error(_capture(*base, "--shard-tokens", "0")) == "error: shard_tokens must be positive, got 0"
    assert _error(_capture(*base, "--ctx-len", "4096", "--n-tokens", "8192")) == (
        f"error: ctx_len 4096 exceeds the 128 positions of model '{tiny_model_dir}'; use --ctx-len 128 or less"
    )
    assert _error(_capture(*base, "--sites", "blocks.7.mlp.hook_post")) == (
        "error: site 'blocks.7.mlp.hook_post' names layer 7, but the model has layers 0..1"
    )
    assert _error(_capture(*base, "--sites", "blocks.*.hook_resid_{pre,post")) == (
        "error: malformed site list 'blocks.*.hook_resid_{pre,post': '{' without '}'"
    )
    bad_choice = _capture(*base, "--dtype", "int8")
    assert (
        bad_choice.exit_code == 2
        and "'int8' is not one of 'float32', 'float16', 'bfloat16'" in bad_choice.output
    )


def test_bad_text_is_named_before_the_model_loads(no_model_load, tiny_model_dir, tmp_path):
    binary, latin, jsonl = tmp_path / "x.txt", tmp_path / "latin.txt", tmp_path / "d.jsonl"
    binary.write_bytes(b"PK\x03\x04\x00\x00zip")
    latin.write_bytes("caf\u00e9 ok".encode("latin-1"))
    jsonl.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    base = ["--model", str(tiny_model_dir), "--data"]
    assert (
        _error(_capture(*base, str(binary)))
        == f"error: {binary}: binary file, not text (NUL byte at offset 4)"
    )
    assert _error(_capture(*base, str(latin))) == f"error: {latin}: not UTF-8 text (byte 0xe9 at offset 3)"
    assert _error(_capture(*base, str(jsonl))) == (
        f"error: {jsonl} line 3: Expecting property name enclosed in double quotes (column 14)"
    )
    run = CliRunner().invoke(
        cli, ["run", "activation-stats", "--model", str(tiny_model_dir), "--data", str(latin)]
    )
    assert _error(run) == f"error: {latin}: not UTF-8 text (byte 0xe9 at offset 3)"


def test_analysis_options_checked_before_the_model_loads(no_model_load):
    out = CliRunner().invoke(cli, ["run", "train-sae", "--d-sae", "-5"])
    assert _error(out) == "error: d_sae must not be negative, got -5"
    arch = CliRunner().invoke(cli, ["run", "train-sae", "--arch", "topkk"])
    assert arch.exit_code == 2 and "'topkk' is not one of 'standard', 'topk'" in arch.output
    with pytest.raises(ValueError) as err:
        wb.api.make_config("train-sae", jumprelu_sparsity="x")
    assert str(err.value) == "jumprelu_sparsity must be one of ['step', 'tanh', 'quadratic'], got 'x'"


def test_readme_sites_example_and_a_short_text(tiny_model, tiny_model_dir, tmp_path, caplog):
    POOL.put(tiny_model)
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["word"] * 50))
    sites = "blocks.*.mlp.hook_post,blocks.*.hook_resid_{pre,post}"  # README, Using it
    with caplog.at_level(logging.WARNING, logger="workbench"):
        out = _capture(
            "--model",
            str(tiny_model_dir),
            "--sites",
            sites,
            "--data",
            str(text),
            "--n-tokens",
            "256",
            "--ctx-len",
            "32",
        )
    assert out.exit_code == 0, out.output
    store = wb.open_store(out.output.split("store: ")[1].split()[0])
    assert store.sites == [  # layer order, then by name
        f"blocks.{i}.{s}" for i in (0, 1) for s in ("hook_resid_post", "hook_resid_pre", "mlp.hook_post")
    ]
    assert store.run["config"]["sites"] == ["blocks.*.mlp.hook_post", "blocks.*.hook_resid_{pre,post}"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"captured {store.n_rows} tokens, fewer than the 256 asked for: the text source ran out ({text})"
        in warnings
    )
    assert store.n_rows < 256


def test_gated_hook_cannot_be_stored(tiny_model, tiny_model_dir, wikitext):
    POOL.put(tiny_model)
    with pytest.raises(ValueError) as err:
        wb.capture(
            model=str(tiny_model_dir), sites="blocks.0.hook_mlp_in", data=wikitext, n_tokens=64, ctx_len=32
        )
    assert str(err.value) == (
        "site 'blocks.0.hook_mlp_in' cannot be stored: the model computes blocks.0.hook_mlp_in only with "
        "use_hook_mlp_in switched on; pick another site"
    )


def test_offline_hub_id_message_is_one_story(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailableError) as err:
        models.resolve("nobody-here/no-such-model")
    assert str(err.value) == (
        "model 'nobody-here/no-such-model' is not a workbench key (smollm2-135m, gemma-3-270m) or a local "
        "folder, and as a Hugging Face Hub id it is not in the local cache while the Hub is unreachable "
        "(offline). Connect once to download it, or pass a local Hugging Face folder. See `workbench models`."
    )


def test_discover_reports_a_broken_module_and_loads_the_rest(monkeypatch, caplog):
    import importlib
    import pkgutil
    from types import SimpleNamespace

    real_import = importlib.import_module
    modules = [SimpleNamespace(name="activation_stats"), SimpleNamespace(name="broken_one")]
    monkeypatch.setattr(pkgutil, "iter_modules", lambda path: modules)

    def fake_import(name, *args):
        if name.endswith("broken_one"):
            raise ImportError("No module named 'missing_dependency'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(analysis, "_discovered", False)
    monkeypatch.setattr(analysis, "FAILED", {})
    with caplog.at_level(logging.WARNING):
        analysis.discover()
    assert analysis.FAILED == {
        "workbench.analyses.broken_one": "ImportError: No module named 'missing_dependency'"
    }
    assert (
        "analysis module workbench.analyses.broken_one failed to import and is skipped: "
        "ImportError: No module named 'missing_dependency'" in caplog.messages
    )
    assert "activation-stats" in {s.name for s in analysis.all_specs()}


def test_registering_a_name_twice_is_an_error():
    def other(cfg: analysis.AnalysisSpec, ctx) -> analysis.Result: ...

    other.__module__ = "somewhere.else"
    with pytest.raises(ValueError) as err:
        analysis.register("activation-stats")(other)
    assert str(err.value) == (
        "analysis 'activation-stats' is registered twice: by workbench.analyses.activation_stats and by somewhere.else"
    )


def test_analysis_capture_keeps_brace_site_lists():
    cfg = wb.api.make_config(
        "activation-stats", sites="blocks.*.mlp.hook_post,blocks.*.hook_resid_{pre,post}"
    )
    assert cfg.capture_config().sites == ("blocks.*.mlp.hook_post", "blocks.*.hook_resid_{pre,post}")


def test_context_checked_against_the_booted_model_when_no_config_is_on_disk(
    tiny_model, tiny_model_dir, monkeypatch
):
    """A GGUF key has no config.json before its first load: the check runs after the load, before compute."""
    POOL.put(tiny_model)
    monkeypatch.setattr(models, "model_config", lambda key: None)
    with pytest.raises(ValueError) as err:
        wb.capture(model=str(tiny_model_dir), n_tokens=512, ctx_len=256, progress=False)
    assert (
        str(err.value)
        == f"ctx_len 256 exceeds the 128 positions of model '{tiny_model_dir}'; use --ctx-len 128 or less"
    )
    assert wb.list_stores() == []


def test_train_sae_json_stays_json_while_resampling_reports(tiny_store):
    """Resampling's progress lines go to stderr: `--json` output is the result's summary alone."""
    store = tiny_store(("blocks.1.hook_resid_post",), 1024)
    opts = ["--store", str(store.root), "--d-sae", "512", "--k", "2", "--steps", "32", "--batch-size", "64"]
    out = CliRunner().invoke(cli, ["run", "train-sae", *opts, "--lr", "0.003", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary[0]["split"] == "held_out" and summary[0]["resampled"] > 0
    assert "resampled" in out.stderr and "resampled" not in out.stdout.replace('"resampled"', "")
