"""Dictionary-feature attribution (analyses/patching/features.py): the splice leaves the forward pass
bit-identical, latents + error add up to the site's own AtP/RelP score, each latent's score is the hand-computed
(f_source - f_base) . W_dec dM/da, and an exact dictionary leaves nothing to its error node."""

from __future__ import annotations

import pytest
import torch
from conftest import plant_identity

from workbench import lrp
from workbench.analyses.patching.attribution import gradients
from workbench.analyses.patching.features import (
    FeatureAttributionError,
    _Splice,
    dictionary_sites,
    feature_attribution,
)
from workbench.analyses.patching.metrics import PromptMetric
from workbench.interventions import hooked
from workbench.sae.archs import ArchSpec, build
from workbench.sae.io import load_dictionary, save_dictionary
from workbench.tasks import load_task, tokenize

SAE_SITE = "blocks.0.hook_resid_post"
Z_SITE = "blocks.1.attn.hook_z"  # [batch, pos, n_heads, d_head]
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def task(tiny_model):
    return tokenize(load_task("ioi", 4), tiny_model)


@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory):
    """A TopK SAE on the residual stream and a transcoder MLP-in -> MLP-out, through disk (SAELens folders)."""
    root = tmp_path_factory.mktemp("dicts")
    sae = build(ArchSpec("topk", 64, 32, k=8), {"hook_name": SAE_SITE}, seed=1)
    tc = build(
        ArchSpec("transcoder", 64, 32, d_out=64), {"hook_name": TC_IN, "hook_name_out": TC_OUT}, seed=2
    )
    z = build(ArchSpec("standard", 64, 32), {"hook_name": Z_SITE}, seed=3)  # SAELens hook_z layout
    z.cfg.reshape_activations = "hook_z"
    made = (("sae", sae), ("tc", tc), ("z", z))
    return {name: load_dictionary(save_dictionary(d, root / name)) for name, d in made}


@pytest.mark.parametrize("kind", ["sae", "tc", "z"])
def test_splice_leaves_the_forward_pass_bit_identical(kind, tiny_model, task, dictionaries):
    sae, tokens = dictionaries[kind], task.groups[0].corrupted
    plain = tiny_model(tokens)
    splice = _Splice(sae, *dictionary_sites(sae), grad=True)
    with torch.enable_grad(), hooked(tiny_model, fwd=splice.hooks()):
        spliced = tiny_model(tokens)
    assert (spliced - plain).abs().max().item() == 0.0
    assert splice.kept["e"].abs().sum() > 0  # a random dictionary: the error term really carries the rest


def _acts(model, tokens, hook):
    got = []
    with torch.no_grad(), hooked(model, fwd=[(hook, lambda x, hook: got.append(x.clone()))]):
        model(tokens)
    return got[0]


def _by_hand(model, task, sae, hook_in, hook_out, method, direction):
    """Per prompt, without any splice: the site score (a_clean - a_corr) . dM/da from the patching
    gradients, and each latent's (f_clean - f_corr) * (W_dec dM/da) summed over positions."""
    site, latents = torch.zeros(len(task.pairs)), torch.zeros(len(task.pairs), sae.cfg.d_sae)
    for g in task.groups:
        metric = PromptMetric("logit_diff", g.answer, g.wrong)
        with lrp.rules(model) if method == "relp" else torch.enable_grad():
            base, source = (g.corrupted, g.clean) if direction == "denoise" else (g.clean, g.corrupted)
            grad = gradients(model, base, [hook_out], metric, torch.arange(len(g.index)))[hook_out]
        delta = _acts(model, source, hook_out) - _acts(model, base, hook_out)
        site[g.index] = (delta * grad).flatten(1).sum(1)
        with torch.no_grad():
            df = sae.encode(_acts(model, source, hook_in)) - sae.encode(_acts(model, base, hook_in))
        latents[g.index] = (df * (grad.flatten(2) @ sae.W_dec.T)).sum(1)
    return site, latents


@pytest.mark.parametrize(
    ("kind", "method", "direction"),
    [
        ("sae", "atp", "denoise"),
        ("sae", "relp", "denoise"),
        ("sae", "relp", "noise"),
        ("tc", "atp", "denoise"),
        ("tc", "relp", "denoise"),
        ("z", "relp", "denoise"),
    ],
)
def test_latents_plus_error_equal_the_sites_own_attribution(
    kind, method, direction, tiny_model, task, dictionaries
):
    sae = dictionaries[kind]
    scores = feature_attribution(tiny_model, task, sae, "logit_diff", method, direction=direction)
    site, latents = _by_hand(tiny_model, task, sae, scores.hook_in, scores.hook_out, method, direction)
    torch.testing.assert_close(scores.site, site, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.latents.sum(-1) + scores.error, scores.site, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.latents, latents, rtol=1e-4, atol=1e-7)


def test_relp_and_atp_differ_on_a_gated_model(tiny_model, task, dictionaries):
    atp = feature_attribution(tiny_model, task, dictionaries["sae"], "logit_diff", "atp")
    relp = feature_attribution(tiny_model, task, dictionaries["sae"], "logit_diff", "relp")
    assert not torch.allclose(atp.latents, relp.latents)


def test_an_exact_dictionary_leaves_nothing_to_the_error_node(tiny_model, task, tmp_path):
    """Planted: W_enc = [I, -I], ReLU, W_dec = [I; -I] reconstructs x exactly (relu(x) - relu(-x))."""
    d = 64
    sae = plant_identity(build(ArchSpec("standard", d, 2 * d), {"hook_name": SAE_SITE}))
    sae = load_dictionary(save_dictionary(sae, tmp_path / "exact"))
    scores = feature_attribution(tiny_model, task, sae, "normalized", "relp")
    assert scores.error.abs().max() < 1e-6 * scores.site.abs().max()
    torch.testing.assert_close(scores.latents.sum(-1), scores.site, rtol=1e-5, atol=1e-7)


def test_top_latents_and_their_dashboard_links(tiny_model, task, dictionaries):
    scores = feature_attribution(
        tiny_model, task, dictionaries["sae"], "logit_diff", "relp", dictionary="/d x"
    )
    top = scores.top(5)
    mean = scores.latents.mean(0)
    assert [i for i, _ in top] == mean.abs().argsort(descending=True)[:5].tolist()
    assert top[0][1] == pytest.approx(float(mean[top[0][0]]))
    assert scores.dashboard_url(7) == "feature_explorer?dictionary=%2Fd+x&latent=7"


def test_bad_inputs_are_one_line_errors_before_any_gradient(tiny_model, task, dictionaries, tmp_path):
    sae = dictionaries["sae"]
    with pytest.raises(
        FeatureAttributionError, match=r"^unknown feature-attribution method 'ig'; choose from atp, relp$"
    ):
        feature_attribution(tiny_model, task, sae, method="ig")
    with pytest.raises(lrp.LRPRuleError, match=r"^unknown LRP rule\(s\) \['nrom'\]"):
        feature_attribution(tiny_model, task, sae, method="relp", rules=("nrom",))
    wide = load_dictionary(
        save_dictionary(build(ArchSpec("topk", 128, 16, k=4), {"hook_name": SAE_SITE}), tmp_path / "w")
    )
    with pytest.raises(
        FeatureAttributionError,
        match=r"^the dictionary reads 128-wide activations but blocks.0.hook_resid_post is 64 wide on this model$",
    ):
        feature_attribution(tiny_model, task, wide)
    compat = build(
        ArchSpec("topk", 64, 16, k=4), {"hook_name": SAE_SITE, "workbench": {"processing": "compat"}}
    )
    with pytest.raises(
        FeatureAttributionError,
        match=r"^dictionary was trained on 'compat' activations but the model runs in 'raw' mode$",
    ):
        feature_attribution(tiny_model, task, compat)
    with pytest.raises(FeatureAttributionError, match=r"^dictionary config has no metadata.hook_name"):
        feature_attribution(tiny_model, task, build(ArchSpec("topk", 64, 16, k=4), {}))
