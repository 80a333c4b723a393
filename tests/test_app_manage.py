"""App tests that need no prefilled home: how the app is served (loopback, the packaged router),
Home's provenance captions and confirmed deletes on a fresh home, and the lens helpers behind the
pages."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app import APP, TEXT, app


def test_home_says_what_results_came_from_and_deletes_after_confirming(workbench_home, tiny_model_dir):
    """A fresh home (not the shared one): two results on one store, one of them deleted, then the store."""
    from workbench import api

    store = api.capture(
        model=str(tiny_model_dir), sites=("blocks.*.mlp.hook_post",), n_tokens=128, ctx_len=32, progress=False
    )
    plain = api.run("activation-stats", store=str(store.root)).cache_key
    tuned = api.run("activation-stats", store=str(store.root), fire_threshold=0.25).cache_key
    at = app()
    about = {r["key"]: r for r in api.results_table()}
    captions = [c.value for c in at.caption]
    for key in (plain, tuned):  # "computed from": the store, its site(s) and the non-default options
        row = about[key[:16]]
        assert row["from"] == store.root.name
        assert (
            " · ".join(x for x in (f"store {store.root.name[:12]}", row["site"], row["options"]) if x)
            in captions
        )
    assert about[tuned[:16]]["options"] == "fire_threshold=0.25" and about[plain[:16]]["options"] == ""

    at.button(key=f"delete-{tuned}").click().run()
    assert [w.value for w in at.warning] == [
        f"Delete this activation-stats result ({tuned[:12]})? Running it again recomputes it."
    ]
    at.button(key="cancel_delete").click().run()
    assert not at.warning and {r["key"] for r in api.cached()} == {plain, tuned}
    at.button(key=f"delete-{tuned}").click().run()
    at.button(key="confirm_delete").click().run()
    assert [x.value for x in at.success] == [f"Deleted the activation-stats result {tuned[:12]}."]
    assert {r["key"] for r in api.cached()} == {plain} and not api.cache().entry_dir(tuned).exists()
    assert f"open-{tuned}" not in {b.key for b in at.button}

    (path,) = [s["path"] for s in api.list_stores()]
    (Path(path) / "notes.txt").write_text("mine")  # a user's file in the store folder is not ours to delete
    at.selectbox(key="delete_store").set_value(path).run()
    assert at.warning[0].value.startswith(f"Delete {path} (") and (Path(path) / "run.json").exists()
    at.button(key="confirm_delete_store").click().run()
    assert [x.value for x in at.success] == [
        f"Deleted the activation store {path}. Kept files that are not the store's: notes.txt."
    ]
    assert api.list_stores() == [] and (Path(path) / "notes.txt").read_text() == "mine"
    assert not at.exception and not at.error


# --- the lens helpers behind the pages -------------------------------------------------
def test_config_fields_and_lens_errors(tiny_model, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from workbench import api

    fields = {f["name"]: f for f in api.config_fields("activation-stats")}
    assert (fields["n_tokens"]["kind"], fields["fire_threshold"]["kind"], fields["skip_bos"]["kind"]) == (
        "int",
        "float",
        "bool",
    )
    assert fields["store"]["doc"].startswith("Path of an existing activation store")
    assert api.parse_form("activation-stats", {"n_tokens": 64}) == {"n_tokens": 64}
    with pytest.raises(api.LensError, match="no option"):
        api.parse_form("activation-stats", {"nope": 1})
    with pytest.raises(api.LensError, match="type some text"):
        api.prompt_lens(tiny_model, "   ", 0)
    narrow = StandardSAE(
        StandardSAEConfig(d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"))
    )
    narrow.save_model(str(tmp_path / "narrow"))
    with pytest.raises(api.LensError, match="with width 32, but model .* has width 64 there"):
        api.prompt_lens(tiny_model, TEXT, 0, dictionary=str(tmp_path / "narrow"))
    assert api.dictionary_info(tmp_path / "narrow")["site"] == "blocks.0.hook_resid_post"


# --- how the app is served -------------------------------------------------------------
def test_app_command_serves_loopback_unless_a_host_is_given(monkeypatch):
    """`workbench app` runs the router shipped in the package on 127.0.0.1; --host opts out."""
    import os

    from click.testing import CliRunner

    from workbench.cli import cli

    launched = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: launched.append(argv))
    for args, address in ([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0"), (["--address", "::1"], "::1"):
        assert CliRunner().invoke(cli, ["app", "--port", "8599", *args]).exit_code == 0
        argv = launched.pop()
        assert argv[argv.index("--server.address") + 1] == address
        assert argv[argv.index("run") + 1] == str(APP)


def test_router_config_keeps_the_server_on_loopback():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    config = tomllib.loads((APP.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
