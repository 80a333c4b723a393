"""Sparsity analysis: exact Lazy-Neuron ratios on a planted ReLU model, exact CETT curves, the PPL-p%
search hitting its target, top-k exactness at k = d_mlp, the cache round trip and the CLI."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import GPT2_TOKENIZER, make_tiny_model_dir

from workbench import analysis, api
from workbench.analyses.sparsity.cett import TailCurves, pplp_search
from workbench.analyses.sparsity.held import HeldEval
from workbench.analyses.sparsity.topk import topk_mask, topk_sweep
from workbench.cli import cli
from workbench.models import load_model

N_ON = 32  # planted always-on neurons in layer 0 of the ReLU model (of d_mlp = 128)
FAST = {"n_tokens": 128, "ctx_len": 32, "batch_size": 4}


def _progress(items, total=None, desc=""):
    return items


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    """GPT-2-shaped ReLU model; layer 0 neurons are constant: N_ON always 1, the rest always 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    folder = tmp_path_factory.mktemp("relu") / "gpt2-relu"
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="relu"
    )
    model = AutoModelForCausalLM.from_config(config)
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [d_model, d_mlp]
    with torch.no_grad():
        c_fc.weight.zero_()
        c_fc.bias.fill_(-1.0)
        c_fc.bias[:N_ON] = 1.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """Tiny Llama whose MLPs dominate sharp logits (down_proj and lm_head scaled up)."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model_dir(tmp_path_factory.mktemp("sharp"), "llama", seed=1)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.mul_(20.0)
        hf.lm_head.weight.mul_(40.0)
    hf.save_pretrained(folder)
    return load_model(str(folder))


def _sample(model, n_seq: int, ctx_len: int, seed: int = 0) -> torch.Tensor:
    """[n_seq, ctx_len] tokens sampled from the model itself (BOS first): it is their best predictor."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((n_seq, 1), model.tokenizer.bos_token_id)
    with torch.no_grad():
        for _ in range(ctx_len - 1):
            probs = model(tokens, return_type="logits")[:, -1].float().softmax(-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return tokens


def test_relu_nonzero_fraction_is_exact(relu_dir, wikitext):
    result = api.run(
        "sparsity", model=str(relu_dir), data=wikitext, ppl_p=0, topk_ks="", fire_def="nonzero", **FAST
    )
    d_mlp = result.d_mlp
    rates = result.rates
    # layer 0 is planted: exactly N_ON / d_mlp nonzero under every definition
    for definition in ("nonzero", "eps", "pre_pos"):
        assert result.layer_ratio(definition)[0] == N_ON / d_mlp
    expected = torch.zeros(d_mlp)
    expected[:N_ON] = 1.0
    assert torch.equal(rates["nonzero"][0], expected)
    dead, on = result.neuron_counts()
    assert (dead[0], on[0]) == (d_mlp - N_ON, N_ON)
    # layer 1 is random: parity with a direct run_with_cache over the same tokens, BOS excluded
    model = load_model(str(relu_dir))
    store = api.open_store(result.store)
    tokens = store.token_ids().view(-1, FAST["ctx_len"])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    post = cache["blocks.1.mlp.hook_post"][:, 1:].flatten(0, 1)  # [tokens, d_mlp]
    assert result.n_tokens == len(post)
    assert torch.equal(rates["nonzero"][1], (post != 0).double().mean(0).float())
    assert 0.05 < result.overall("nonzero") < 0.95
    assert result.summary()[-1]["ratio_nonzero"] == pytest.approx(result.overall("nonzero"))


def test_tail_curves_match_direct_cett(tiny_model):
    torch.manual_seed(0)
    acts = torch.randn(10, tiny_model.cfg.d_mlp)
    W_out = tiny_model.W_out[0].detach().float()
    curves = TailCurves(chunk=3)
    curves.add_layer(0, acts, W_out)
    n = acts.abs() * W_out.norm(dim=-1)
    y = (acts @ W_out).norm(dim=-1)
    for t in [-1.0, *n.flatten().quantile(torch.tensor([0.1, 0.5, 0.9])).tolist(), n.max().item()]:
        direct = ((acts * (n <= t)) @ W_out).norm(dim=-1) / y
        assert curves.cett(0, t) == pytest.approx(direct.mean().item(), rel=1e-4, abs=1e-6)
    t = curves.threshold(0, 0.3)
    assert curves.cett(0, t) <= 0.3 < curves.cett(0, t + 1e-3)


@pytest.fixture(scope="module")
def sharp_setup(sharp_model):
    tokens = _sample(sharp_model, 8, 24)
    held = HeldEval(sharp_model, tokens[4:], batch_size=4)
    with torch.no_grad():
        _, cache = sharp_model.run_with_cache(tokens[:4], names_filter=lambda n: n.endswith("mlp.hook_post"))
    W_out = sharp_model.W_out.detach().float()
    curves = TailCurves()
    for layer in range(sharp_model.cfg.n_layers):
        curves.add_layer(layer, cache[f"blocks.{layer}.mlp.hook_post"][:, 1:].flatten(0, 1), W_out[layer])
    w_norms = {layer: W_out[layer].norm(dim=-1) for layer in range(sharp_model.cfg.n_layers)}
    calib = {layer: cache[f"blocks.{layer}.mlp.hook_post"][:, 1:].flatten(0, 1) for layer in w_norms}
    return held, curves, w_norms, calib


def _thresholded_run(model, tokens, thresholds, w_norms):
    """Loss and per-layer kept fraction with a_i zeroed where |a_i|*||w_i|| <= t_l from position 1
    on, written apart from `cett_hooks` and `HeldEval` (one forward pass, its own counting)."""
    kept = {layer: [0, 0] for layer in thresholds}

    def zero_tail(act, hook):
        layer = int(hook.name.split(".")[1])
        a = act[:, 1:]
        keep = a.abs() * w_norms[layer] > thresholds[layer]
        kept[layer][0] += int((keep & (a != 0)).sum())
        kept[layer][1] += keep.numel()
        return torch.cat([act[:, :1], a * keep], dim=1)

    hooks = [(f"blocks.{layer}.mlp.hook_post", zero_tail) for layer in thresholds]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits").float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return loss.item(), kept


def _direct_cett(acts, W_out, t):
    n = acts.abs() * W_out.norm(dim=-1)
    return (((acts * (n <= t)) @ W_out).norm(dim=-1) / (acts @ W_out).norm(dim=-1)).mean().item()


@pytest.mark.parametrize("p", [1.0, 5.0])
def test_pplp_search_hits_target(sharp_setup, sharp_model, p):
    held, curves, w_norms, calib = sharp_setup
    tol = 0.002 * (1 + p)
    out = pplp_search(curves, held, w_norms, p, tol, max_iters=30, first_pos=1, progress=_progress)
    assert out["converged"], out["trace"]
    assert abs(out["ppl_ratio"] - (1 + p / 100)) <= tol
    assert 0 < out["cett"] < 1 and len(out["layer_ratio"]) == len(out["thresholds"]) == 2
    # each layer's threshold is the largest with CETT <= c on the calibration tokens (direct matmul)
    W_out = sharp_model.W_out.detach().float()
    for layer, t in enumerate(out["thresholds"]):
        assert _direct_cett(calib[layer], W_out[layer], t) <= out["cett"] + 1e-6
        assert _direct_cett(calib[layer], W_out[layer], t * 1.001 + 1e-6) > out["cett"] - 1e-6
    # the reported loss, PPL ratio and activation ratios are those of an independent thresholded run
    thresholds = dict(enumerate(out["thresholds"]))
    loss, kept = _thresholded_run(sharp_model, held.tokens, thresholds, w_norms)
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ppl_ratio"] == pytest.approx(math.exp(loss - held.dense.loss), rel=1e-5)
    assert out["layer_ratio"] == pytest.approx([kept[layer][0] / kept[layer][1] for layer in thresholds])
    assert out["ratio"] == pytest.approx(sum(k for k, _ in kept.values()) / sum(n for _, n in kept.values()))


def test_topk_full_width_is_exact_and_smaller_k_hurts(sharp_setup, sharp_model):
    held, _, w_norms, _ = sharp_setup
    d_mlp = sharp_model.cfg.d_mlp
    ks = [1, 4, 16, 64, d_mlp]
    rows = topk_sweep(held, [0, 1], ks, w_norms, first_pos=1, score="abs", progress=_progress)
    assert rows[-1]["loss"] == held.dense.loss  # exact, not approximate
    assert rows[-1]["top1_agree"] == 1.0 and rows[-1]["active_ratio"] == 1.0
    deltas = [r["delta_loss"] for r in rows]
    assert all(d > 0 for d in deltas[:-1])
    assert deltas[0] > deltas[1] > deltas[2] > deltas[3]  # monotone on this model
    assert [r["active_ratio"] for r in rows[:-1]] == pytest.approx([k / d_mlp for k in ks[:-1]])


def test_topk_mask_is_per_token():
    score = torch.tensor([[[5.0, 1.0, 3.0], [0.1, 0.2, 0.3]]])  # [batch, pos, d_mlp]
    mask = topk_mask(score, 1)
    # ranking over the flattened tensor would keep nothing at the second token
    assert mask.tolist() == [[[True, False, False], [False, False, True]]]


def test_result_round_trips_through_cache(tiny_model_dir, wikitext, monkeypatch):
    opts = {"model": str(tiny_model_dir), "data": wikitext, "held_tokens": 64, "cett_tokens": 32, **FAST}
    opts |= {"search_iters": 3, "topk_ks": "0.1,1"}
    first = api.run("sparsity", **opts)
    spec = analysis.get("sparsity")

    def boom(cfg, ctx):
        raise AssertionError("cache miss: the analysis ran again")

    monkeypatch.setitem(analysis._REGISTRY, "sparsity", dataclasses.replace(spec, fn=boom))
    second = api.run("sparsity", **opts)
    assert second.cache_key == first.cache_key
    assert second.rates.keys() == first.rates.keys()
    assert all(torch.equal(first.rates[k], second.rates[k]) for k in first.rates)
    assert second.pplp == first.pplp and second.topk == first.topk
    assert second.summary() == first.summary()
    assert set(second.figures()) == {
        "activation ratio by layer",
        "firing-rate histogram",
        "dead and always-on neurons",
        "top-k: loss vs k",
        "PPL ratio vs CETT",
    }
    assert "hook_post" in second.definitions["nonzero"]


def test_cli_help_and_bad_option():
    runner = CliRunner()
    out = runner.invoke(cli, ["run", "sparsity", "--help"])
    assert out.exit_code == 0
    for option in (
        "--ppl-p",
        "--topk-ks",
        "--topk-layers",
        "--cett-tokens",
        "--eps",
        "--fire-def",
        "--skip-bos",
    ):
        assert option in out.output
    bad = runner.invoke(cli, ["run", "sparsity", "--fire-def", "sometimes"])
    assert bad.exit_code == 2
    assert (
        "Invalid value for '--fire-def': 'sometimes' is not one of 'nonzero', 'eps', 'pre_pos'" in bad.output
    )
    bad = runner.invoke(cli, ["sparsity", "--topk-ks", "a,b"])
    assert bad.exit_code == 2 and "topk_ks" in bad.output


def test_large_preset_is_a_valid_config():
    import json
    from pathlib import Path

    preset = json.loads((Path(__file__).parents[1] / "data" / "presets" / "sparsity-large.json").read_text())
    assert preset["analysis"] == "sparsity"
    cfg = analysis.get("sparsity").make_config(**preset["config"])
    assert cfg.k_values(1536)[-1] == 1536 and cfg.n_tokens > 4096


def test_reads_a_given_store_and_names_missing_sites(tiny_model_dir, wikitext):
    from workbench.store import StoreError

    common = {
        "model": str(tiny_model_dir),
        "data": wikitext,
        "n_tokens": 64,
        "ctx_len": 32,
        "progress": False,
    }
    post_only = api.capture(sites=["blocks.*.mlp.hook_post"], **common)
    result = api.run("sparsity", store=str(post_only.root), ppl_p=0, topk_ks="")
    assert set(result.rates) == {"nonzero", "eps"} and result.layers == [0, 1]
    assert "ratio_pre_pos" not in result.summary()[0]
    resid = api.capture(sites=["blocks.*.hook_resid_post"], **common)
    with pytest.raises(StoreError, match="no blocks.\\*.mlp.hook_post"):
        api.run("sparsity", store=str(resid.root), ppl_p=0, topk_ks="")
