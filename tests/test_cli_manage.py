"""Listing what results were computed from; deleting results and stores; presets without
machine-specific paths; commands that compute nothing stay fast."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import workbench as wb
from workbench import api
from workbench.cli import cli

PRESETS = Path(__file__).parents[1] / "data" / "presets"


@pytest.fixture
def store(tiny_store):
    return tiny_store("blocks.*.mlp.hook_post", n_tokens=128)


def test_results_say_what_each_was_computed_from(store):
    wb.run("activation-stats", store=str(store.root), fire_threshold=0.5)
    out = CliRunner().invoke(cli, ["results"])
    assert out.exit_code == 0, out.output
    header, row = out.output.splitlines()[:2]
    assert header.split() == ["key", "analysis", "model", "from", "site", "options", "duration"]
    assert row.split()[1:6] == [
        "activation-stats",
        store.config["model"],
        store.root.name,
        "blocks.*.mlp.hook_post",  # the store's sites, not an option the user chose
        "fire_threshold=0.5",
    ]
    [described] = api.results_table()
    assert described["from"] == store.root.name and described["site"] == "blocks.*.mlp.hook_post"


def test_rm_asks_and_deletes_one_result(store):
    result = wb.run("activation-stats", store=str(store.root))
    runner = CliRunner()
    kept = runner.invoke(cli, ["rm", result.cache_key[:10]], input="n\n")
    assert kept.exit_code == 1 and "Aborted" in kept.output and api.cache().get(result.cache_key) is not None
    gone = runner.invoke(cli, ["rm", result.cache_key[:10], "--yes"])
    assert gone.output.strip() == f"deleted result {result.cache_key[:16]} (activation-stats)"
    assert api.cache().get(result.cache_key) is None and wb.cached() == []
    again = runner.invoke(cli, ["rm", result.cache_key[:10], "--yes"])
    assert again.exit_code == 2
    assert again.output.strip() == f"error: no cached result matches '{result.cache_key[:10]}'"


def test_rm_store_refuses_non_stores_and_keeps_foreign_files(store, tmp_path):
    runner = CliRunner()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    refused = runner.invoke(cli, ["rm-store", str(folder), "--yes"])
    assert refused.exit_code == 2
    assert refused.output.strip() == (
        f"error: {folder} is not an activation store (no run.json or manifest.parquet); nothing deleted"
    )
    assert (folder / "notes.txt").read_text() == "keep me"
    (store.root / "notes.txt").write_text("not the store's")
    by_id = runner.invoke(cli, ["rm-store", store.root.name], input="y\n")
    assert by_id.exit_code == 0, by_id.output
    assert by_id.output.strip().endswith(
        f"deleted store {store.root}; kept files that are not the store's: notes.txt"
    )
    assert sorted(p.name for p in store.root.iterdir()) == ["notes.txt"]
    assert wb.list_stores() == []


def test_presets_name_no_machine_paths_and_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_SHARED", "/srv/shared")
    for path in sorted(PRESETS.glob("*.json")):
        preset = json.loads(path.read_text())
        for value in preset["config"].values():
            if isinstance(value, str):
                assert not any(p.strip().startswith(("/", "~")) for p in value.split(",")), (path.name, value)
        values = api.load_preset(path, preset["analysis"])
        if "data" in values:
            assert values["data"].startswith("/srv/shared/data/wikitext-2-raw-test/wiki.test.raw")
            assert "$" not in values["data"]


def test_preset_capture_options_yield_to_a_given_store(store, tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(
        json.dumps({"analysis": "activation-stats", "config": {"n_tokens": 8192, "ctx_len": 256}})
    )
    out = CliRunner().invoke(
        cli, ["run", "activation-stats", "--preset", str(preset), "--store", str(store.root), "--json"]
    )
    assert out.exit_code == 0, out.output
    assert wb.cached()[0]["config"]["n_tokens"] == 128 and wb.cached()[0]["config"]["ctx_len"] == 32


@pytest.mark.parametrize("command", [["--help"], ["models"], ["results"], ["stores"], ["list"]], ids=" ".join)
def test_commands_that_compute_nothing_do_not_import_torch(command, tmp_path):
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path)}
    code = (
        "import sys; from workbench.cli import cli\n"
        f"try: cli({command!r})\n"
        "except SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr)"
    )
    if command == ["list"]:  # the first listing imports the analyses and records them
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "LIGHT", out.stderr  # torch alone costs 2-4 s to import


def test_listings_name_the_task_a_patching_result_came_from(tmp_path):
    """Inputs other than store/model (a task file, a dictionary) are part of "options"."""
    from workbench import analysis, manage

    task = tmp_path / "pairs.csv"
    task.write_text("clean,corrupted,answer,wrong\nA B,B A, A, B\n")
    cfg = analysis.get("patching").make_config(task=str(task), n_prompts=1)
    options = manage.computed_from(cfg)["options"]
    assert options["task"] == str(task.resolve()) and options["n_prompts"] == 1
    assert "task" not in manage.computed_from(analysis.get("patching").make_config())["options"]
