"""The API and CLI: cached runs, recompute of corrupt entries, activation statistics, clean errors."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import workbench as wb
from workbench import analysis
from workbench.cli import cli


@pytest.fixture
def store(tiny_store):
    return tiny_store(("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post"), n_tokens=256)


def test_activation_stats_values(store):
    result = wb.run("activation-stats", store=str(store.root))
    row = next(r for r in result.table if r["site"] == "blocks.1.mlp.hook_post")
    x = store.read("blocks.1.mlp.hook_post")
    x = x[torch.arange(len(x)) % 32 != 0].double()  # BOS rows skipped by default
    assert row["mean"] == pytest.approx(x.mean().item(), rel=1e-6)
    assert row["std"] == pytest.approx(x.std(unbiased=False).item(), rel=1e-5)
    assert row["norm"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-6)
    assert row["frac_pos"] == pytest.approx((x > 0).double().mean().item())
    z = (x - x.mean()) / x.std(unbiased=False)
    assert row["kurtosis"] == pytest.approx((z**4).mean().item() - 3, rel=1e-4)
    # firing rule (workbench.firing): SwiGLU neurons are signed, so |a| > 0.1 max|a|, not a > 0
    assert (x.min(0).values < 0).all() and row["signed_frac"] == 1.0
    on = x.abs() > 0.1 * x.abs().max(0).values
    assert torch.allclose(result.firing_rate["blocks.1.mlp.hook_post"], on.float().mean(0))
    fixed = wb.run("activation-stats", store=str(store.root), fire_threshold=0.01)
    assert torch.allclose(fixed.firing_rate["blocks.1.mlp.hook_post"], (x > 0.01).float().mean(0))
    assert "0.1 × max|a|" in result.firing_rule and fixed.firing_rule == "a dimension fires when a > 0.01"
    assert set(result.figures()) >= {"norm by layer", "firing-rate histogram"}


def test_second_run_is_a_cache_hit_and_corrupt_entry_recomputes(store, monkeypatch):
    first = wb.run("activation-stats", store=str(store.root))
    calls = []
    spec = analysis.get("activation-stats")
    counting = dataclasses.replace(spec, fn=lambda cfg, ctx: calls.append(1) or spec.fn(cfg, ctx))
    monkeypatch.setitem(analysis._REGISTRY, "activation-stats", counting)
    again = wb.run("activation-stats", store=str(store.root))
    assert again.cache_key == first.cache_key and again.table == first.table
    assert wb.cached("activation-stats")[0]["key"] == first.cache_key
    entry_dir = wb.api.cache().entry_dir(first.cache_key)
    (entry_dir / "arrays.safetensors").write_bytes(b"garbage")
    assert calls == []
    recomputed = wb.run("activation-stats", store=str(store.root))
    assert calls == [1] and recomputed.table == first.table
    assert torch.equal(
        wb.load(first.cache_key).firing_rate["blocks.0.mlp.hook_post"],
        first.firing_rate["blocks.0.mlp.hook_post"],
    )


def test_cli_run_show_and_errors(store, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["run", "activation-stats", "--store", str(store.root), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert {r["site"] for r in rows} == set(store.sites)
    html = tmp_path / "figs.html"
    key = wb.cached()[0]["key"]
    shown = runner.invoke(cli, ["show", key[:10], "--html", str(html)])
    assert shown.exit_code == 0 and "blocks.1.mlp.hook_post" in shown.output and "plotly" in html.read_text()

    missing = runner.invoke(cli, ["activation-stats", "--store", str(tmp_path / "nope")])
    assert (
        missing.exit_code == 2
        and "no activation store" in missing.output
        and "Traceback" not in missing.output
    )
    bad_site = runner.invoke(
        cli,
        [
            "capture",
            "--model",
            store.config["model"],
            "--sites",
            "blocks.*.mlp.hook_nope",
            "--n-tokens",
            "64",
            "--ctx-len",
            "32",
        ],
    )
    assert bad_site.exit_code == 2 and "Valid sites:" in bad_site.output
    bad_opt = runner.invoke(cli, ["run", "activation-stats", "--n-tokens", "10", "--store", ""])
    assert bad_opt.exit_code == 2 and "error:" in bad_opt.output


def test_preset_values_and_explicit_options(store, tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(
        json.dumps(
            {"analysis": "activation-stats", "config": {"store": str(store.root), "fire_threshold": 0.5}}
        )
    )
    out = CliRunner().invoke(
        cli, ["run", "activation-stats", "--preset", str(preset), "--fire-threshold", "0.25", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert wb.cached()[0]["config"]["fire_threshold"] == 0.25 and wb.cached()[0]["config"]["store"] == str(
        store.root
    )


def test_show_json_prints_plain_fields(store):
    result = wb.run("activation-stats", store=str(store.root))
    out = CliRunner().invoke(cli, ["show", result.cache_key[:12], "--json"])
    assert out.exit_code == 0, out.output
    fields = json.loads(out.stdout)
    assert fields["n_tokens"] == result.n_tokens and fields["table"][0]["site"] == result.table[0]["site"]


def test_every_preset_is_a_valid_config():
    import json
    from pathlib import Path

    from workbench import api

    presets = sorted((Path(__file__).parents[1] / "data" / "presets").glob("*.json"))
    assert len(presets) >= 3
    for path in presets:
        preset = json.loads(path.read_text())
        cfg = api.make_config(preset["analysis"], **preset["config"])
        assert all(getattr(cfg, k) == v for k, v in preset["config"].items()), path.name


def test_analysis_registered_at_run_time_is_listed(monkeypatch):
    """A notebook's own @register shows in list_analyses, not just the on-disk listing."""

    @dataclasses.dataclass(frozen=True)
    class NoteConfig:
        n: int = 1

    monkeypatch.setattr(analysis, "_REGISTRY", dict(analysis._REGISTRY))
    wb.list_analyses()  # writes $WORKBENCH_HOME/analyses.json, the import-free listing

    @analysis.register("notebook-analysis")
    def run(cfg: NoteConfig, ctx) -> analysis.Result:
        """Planted by a notebook."""
        return analysis.Result()

    names = [row["name"] for row in wb.list_analyses()]
    assert "notebook-analysis" in names and "activation-stats" in names
