"""Feature attribution wired into the `patching` analysis: a dictionary given to `api.run` adds per-method
latent + error scores that add up to the site's own AtP/RelP score, a cached round trip, a figure, a cache
key that follows the dictionary's contents, and one readable error for a bad dictionary before the model loads."""

import pytest
import torch

from workbench import api
from workbench.analyses.patching.features import FeatureAttributionError, pack
from workbench.context import POOL, Context
from workbench.sae.archs import ArchSpec, build
from workbench.sae.io import save_dictionary

SITE = "blocks.0.hook_resid_post"
BASE = {"n_prompts": 3, "methods": "atp,relp", "components": "resid_pre", "seed": 2}


@pytest.fixture
def dictionary(tmp_path):
    return str(
        save_dictionary(build(ArchSpec("topk", 64, 32, k=8), {"hook_name": SITE}, seed=1), tmp_path / "d")
    )


@pytest.fixture
def run(tiny_model, tiny_model_dir):
    POOL.put(tiny_model)
    return lambda **kw: api.run("patching", model=str(tiny_model_dir), **(BASE | kw))


def _check_linear(result, methods):
    assert sorted(k.split("/")[0] for k in result.features if "/" in k) == sorted(methods * 4)
    for m in methods:
        f = result.features
        total = f[f"{m}/latents"].sum(-1) + f[f"{m}/rest"] + f[f"{m}/error"]
        torch.testing.assert_close(total, f[f"{m}/site"], atol=1e-5, rtol=1e-4)
        assert f[f"{m}/site"].abs().sum() > 0 and f[f"{m}/latents"].abs().sum() > 0  # not trivially 0 = 0


def test_dictionary_run_is_linear_cached_and_renders(run, dictionary):
    result = run(dictionary=dictionary, feature_top_k=5)
    assert result.feature_hooks == [SITE, SITE]
    assert result.features["feature_ids"].tolist() == list(range(32))  # small: every latent kept
    assert result.features["atp/latents"].shape == (3, 32)
    _check_linear(result, ["atp", "relp"])
    for m in ("atp", "relp"):
        mean = result.features[f"{m}/latents"].mean(0)
        top = result.feature_top[m]
        assert [t["latent"] for t in top] == mean.abs().argsort(descending=True)[:5].tolist()
        assert top[0]["url"] == f"feature_explorer?dictionary={_quoted(dictionary)}&latent={top[0]['latent']}"
    pre1 = result.scores["atp/resid_pre"][:, 1].sum(-1)  # resid_post 0 is resid_pre 1: the same AtP number
    torch.testing.assert_close(result.features["atp/site"], pre1, atol=1e-5, rtol=1e-4)
    loaded = api.load(result.cache_key)
    for k, v in result.features.items():
        assert torch.equal(loaded.features[k], v), k
    assert loaded.feature_top == result.feature_top and loaded.dictionary == result.dictionary
    figs = loaded.figures()
    bars = figs["Feature attribution: top latents"]
    assert [t.x[-1] for t in bars.data] == ["error", "error"] and len(bars.data[0].x) == 6
    bars.to_json()
    assert {r["method"]: r["top_latent"] for r in run(dictionary=dictionary, methods="ap,atp").summary()} == {
        "AP": None,
        "AtP": result.feature_top["atp"][0]["latent"],
    }  # every row has the feature columns
    row = loaded.summary()[0]
    assert row["feature_site"] == round(float(result.features["atp/site"].mean()), 4)
    assert row["top_latent"] == result.feature_top["atp"][0]["latent"]


def _quoted(path):
    from urllib.parse import quote_plus

    return quote_plus(path)


@pytest.mark.parametrize(
    "opts",
    [
        {"direction": "noise", "metric": "logit_diff"},
        {"metric": "prob", "relp_rules": "norm", "relp_ah": True},
    ],
    ids=["noise-logit_diff", "prob-relp_norm_ah"],
)
def test_feature_site_follows_the_runs_direction_metric_and_rules(run, dictionary, opts):
    """The site total equals the run's own AtP/RelP map at the same site (resid_pre of layer 1), so the
    run's direction, metric and RelP rules reach the feature attribution."""
    result = run(dictionary=dictionary, **opts)
    _check_linear(result, ["atp", "relp"])
    for m in ("atp", "relp"):
        pre1 = result.scores[f"{m}/resid_pre"][:, 1].sum(-1)
        torch.testing.assert_close(result.features[f"{m}/site"], pre1, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(result.features["atp/site"], result.features["relp/site"])  # rules did act


def test_cache_key_follows_the_dictionary_contents(run, dictionary, tmp_path):
    first = api.key_for("patching", api.make_config("patching", **BASE, dictionary=dictionary))
    assert api.key_for("patching", api.make_config("patching", **BASE, dictionary=dictionary + "/")) == first
    save_dictionary(
        build(ArchSpec("topk", 64, 32, k=8), {"hook_name": SITE}, seed=9), dictionary
    )  # retrained
    assert api.key_for("patching", api.make_config("patching", **BASE, dictionary=dictionary)) != first


def test_bad_dictionary_is_one_error_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatureAttributionError) as err:
        api.make_config("patching", dictionary=str(empty))
    assert str(err.value) == f"dictionary {empty} holds no cfg.json; it is not a SAELens dictionary folder"
    with pytest.raises(FeatureAttributionError, match="needs method atp or relp; methods are ap,ig"):
        api.make_config("patching", dictionary=str(empty), methods="ap,ig")
    # a missing folder: the load fails before the model is loaded
    monkeypatch.setattr(Context, "model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FeatureAttributionError) as err:
        api.run("patching", model=str(tiny_model_dir), dictionary=str(tmp_path / "nope"))
    assert str(err.value).startswith(
        f"cannot load dictionary: '{tmp_path / 'nope'}' is neither a dictionary folder"
    )


def test_big_dictionaries_keep_only_the_top_latents_and_stay_linear(run, dictionary):
    result = run(dictionary=dictionary, feature_top_k=3, methods="atp")
    from workbench.analyses.patching.features import FeatureScores

    f = result.features
    scores = FeatureScores(f["atp/latents"], f["atp/error"], f["atp/site"], SITE, SITE, "atp", "d")
    packed = pack({"atp": scores}, 3, max_cells=10)
    ids = packed["features"]["feature_ids"]
    assert ids.tolist() == sorted(t["latent"] for t in result.feature_top["atp"])
    kept = packed["features"]
    assert kept["atp/latents"].shape == (3, 3)
    torch.testing.assert_close(kept["atp/latents"].sum(-1) + kept["atp/rest"], f["atp/latents"].sum(-1))
