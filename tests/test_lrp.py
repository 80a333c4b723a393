"""LRP rules at run time (workbench/lrp.py): the forward is untouched, the backward follows RelP's rules
(checked against hand-written references and by relevance conservation), and nothing stays on the model."""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager, nullcontext
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model_dir

from workbench.lrp import STABILIZER, LRPRuleError, _norm_rule, check_rules, rules

_LEVEL = -4242  # the tests' own hooks
TOKENS = torch.tensor(
    [[50256, 464, 3139, 286, 4881, 318, 6342, 13], [50256, 1722, 1757, 290, 5335, 1816, 284, 262]]
)
A, B = 11, 17  # the two answer tokens of the logit-difference metric


@pytest.fixture(scope="module")
def gpt2_model(tiny_models_root):
    from workbench.models import load_model

    return load_model(str(make_tiny_model_dir(tiny_models_root, "gpt2")))


@contextmanager
def grab(model, names):
    """Tensors seen at hook points `names` during the block's forward passes (the last pass wins)."""
    got, points, owner = {}, [model.hook_dict[n] for n in names], threading.get_ident()

    def keep(name, t, hook):
        if threading.get_ident() == owner:  # another thread's forward pass is not this test's
            got[name] = t

    for name, point in zip(names, points):
        point.add_hook(partial(keep, name), level=_LEVEL)
    try:
        yield got
    finally:
        for point in points:
            point.remove_hooks("fwd", level=_LEVEL)


def logit_diff(logits):
    return (logits[:, -1, A] - logits[:, -1, B]).sum()


def relevance(model, ctx, inp: str, out: str | None = None, seed: int = 0):
    """(sum of x * dL/dx at `inp`, L) with L = <y, r> for a random r at `out`, or the logit difference."""
    with grab(model, [inp] + ([out] if out else [])) as got, ctx:
        logits = model(TOKENS)
        if out:
            r = torch.randn(got[out].shape, generator=torch.Generator().manual_seed(seed))
            loss = (got[out] * r).sum()
        else:
            loss = logit_diff(logits)
        (grad,) = torch.autograd.grad(loss, got[inp])
    return (got[inp] * grad).sum().item(), loss.item(), grad


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_is_bit_identical_and_every_rule_fires(arch, tiny_model, gpt2_model):
    model = tiny_model if arch == "llama" else gpt2_model
    n = model.cfg.n_layers
    plain = model(TOKENS)
    with rules(model, ah=True, epsilon=1e-2) as applied:
        ruled = model(TOKENS)
    assert (ruled - plain).abs().max().item() == 0.0
    linears = 7 if arch == "llama" else 6  # q k v o (+ gate) in out per block
    expected = {"norm": 2 * n + 1, "identity": n, "ah": n, "epsilon": linears * n + 1}
    if arch == "llama":
        expected["half"] = n  # GPT-2's MLP has no gated product: the half rule has nothing to do
    assert dict(applied) == expected


def _rms(x, w, eps):
    return w * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()


def _stab(x):
    return x + STABILIZER * torch.where(x >= 0, 1.0, -1.0)


def test_gated_mlp_block_matches_hand_written_rules_and_conserves(tiny_model):
    """resid_mid -> ln2 -> SwiGLU MLP -> mlp_out under norm + identity + half: the modified gradient equals
    the fork's formulas written out by hand, and sum(x * grad) at the input equals <y, r> at the output."""
    model, site_in, site_out = tiny_model, "blocks.1.ln2.hook_in", "blocks.1.hook_mlp_out"
    r_in, r_out, grad = relevance(model, rules(model), site_in, site_out)
    assert rel_err(r_in, r_out) < 1e-4
    plain_in, plain_out, _ = relevance(model, nullcontext(), site_in, site_out)
    assert plain_out == r_out and rel_err(plain_in, plain_out) > 1e-2  # the plain gradient does not conserve

    with grab(model, [site_in]) as got:
        model(TOKENS)
    x = got[site_in].detach().requires_grad_(True)
    ln, mlp = model.blocks[1].ln2.original_component, model.blocks[1].mlp.original_component
    n = _rms(x, ln.weight, ln.variance_epsilon)
    g, u = n @ mlp.gate_proj.weight.T, n @ mlp.up_proj.weight.T
    # identity rule with the forward value kept exact: value silu(g), slope silu(g) / g
    a = F.silu(g).detach() + (g - g.detach()) * (F.silu(g) / _stab(g)).detach()
    h = a * u
    h = h / 2 + (h / 2).detach()  # half rule
    y = h @ mlp.down_proj.weight.T
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    (expected,) = torch.autograd.grad((y * r).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_ungated_mlp_block_identity_rule(gpt2_model):
    """GPT-2's GELU MLP: slope gelu(x)/x replaces gelu'(x); with its zero-initialised biases it conserves."""
    model = gpt2_model
    mlp = model.blocks[0].mlp
    with grab(model, ["blocks.0.mlp.hook_pre", "blocks.0.hook_mlp_out"]) as got, rules(model, ["identity"]):
        model(TOKENS)
        pre, out = got["blocks.0.mlp.hook_pre"], got["blocks.0.hook_mlp_out"]
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad((out * r).sum(), pre)
    pre = pre.detach()
    expected = (r @ mlp.W_out.T) * mlp.original_component.act(pre) / _stab(pre)
    torch.testing.assert_close(grad, expected)
    r_in, r_out, _ = relevance(model, rules(model), "blocks.0.ln2.hook_in", "blocks.0.hook_mlp_out")
    assert rel_err(r_in, r_out) < 1e-4


def test_whole_bias_free_llama_conserves_only_with_the_ah_rule(tiny_model):
    """Metric -> input embeddings: sum(embed * grad) == logit difference when the softmax is a constant."""
    biases = [p for n, p in tiny_model.named_parameters() if n.endswith("bias")]
    assert all(not b.any() for b in biases)  # bias-free (the Bridge adds a zero unembedding bias)
    r_in, metric, _ = relevance(tiny_model, rules(tiny_model, ah=True), "embed.hook_out")
    assert rel_err(r_in, metric) < 1e-4
    r_in_softmax, metric_softmax, _ = relevance(tiny_model, rules(tiny_model), "embed.hook_out")
    assert metric_softmax == metric and rel_err(r_in_softmax, metric) > 1e-3  # softmax leaks relevance


def test_ah_rule_sends_nothing_to_queries_and_keys(tiny_model):
    q = "blocks.1.attn.hook_attn_scores"  # pre-softmax: the only way from the metric to queries and keys
    with grab(tiny_model, [q]) as got, rules(tiny_model, [], ah=True):
        (grad,) = torch.autograd.grad(logit_diff(tiny_model(TOKENS)), got[q], allow_unused=True)
    assert grad is None or not grad.any()
    with grab(tiny_model, [q]) as got:
        (grad,) = torch.autograd.grad(logit_diff(tiny_model(TOKENS)), got[q])
    assert grad.abs().sum() > 0


def test_epsilon_rule_scales_the_output_gradient_of_each_projection(tiny_model):
    # z is read downstream of the projection (hook_mlp_out has its values): a test hook on the projection's
    # own hook_out runs before the rule's and would see the tensor the rule replaces
    eps, h_site, z_site = 0.05, "blocks.0.mlp.out.hook_in", "blocks.0.hook_mlp_out"
    with grab(tiny_model, [h_site, z_site]) as got, rules(tiny_model, [], epsilon=eps):
        tiny_model(TOKENS)
        z = got[z_site]
        r = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
        (grad,) = torch.autograd.grad((z * r).sum(), got[h_site])
    z = z.detach()
    expected = (r * z / (z + eps * torch.where(z >= 0, 1.0, -1.0))) @ tiny_model.blocks[0].mlp.out.weight
    torch.testing.assert_close(grad, expected)


def test_changing_the_rule_list_changes_the_backward_and_nothing_else(tiny_model):
    before = relevance(tiny_model, nullcontext(), "embed.hook_out")
    runs = [
        relevance(tiny_model, rules(tiny_model, names), "embed.hook_out")
        for names in [("norm",), ("norm", "identity"), ("norm", "identity", "half"), "norm,identity,half"]
    ]
    after = relevance(tiny_model, nullcontext(), "embed.hook_out")
    assert {r[1] for r in [before, *runs, after]} == {before[1]}  # the metric (forward) never moves
    grads = [before[2], *(r[2] for r in runs[:3])]
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            assert not torch.allclose(grads[i], grads[j], atol=1e-6), (i, j)
    assert torch.equal(runs[2][2], runs[3][2])  # a comma-separated string means the same list
    assert torch.equal(after[2], before[2])  # leaving the block restores the plain backward exactly


def _snapshot(model):
    """Everything a rule could leave behind: weights, grads, hooks of every kind, module attributes."""
    simple = (bool, int, float, str, type(None))
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [p.grad is None for p in model.parameters()],
        "hooks": {
            name: tuple(
                len(getattr(m, attr, ()))
                for attr in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "fwd_hooks",
                    "bwd_hooks",
                )
            )
            for name, m in model.named_modules()
        },
        "attrs": {
            name: {k: v for k, v in vars(m).items() if isinstance(v, simple)} | {"keys": sorted(vars(m))}
            for name, m in model.named_modules()
        },
    }


def _assert_same(a, b):
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert (a["grads"], a["hooks"], a["attrs"]) == (b["grads"], b["hooks"], b["attrs"])


def test_pooled_model_unchanged_after_a_run_and_after_a_failing_run(tiny_model):
    tiny_model(TOKENS)  # the Bridge sets its own bookkeeping attributes on the first pass
    before = _snapshot(tiny_model)
    relevance(tiny_model, rules(tiny_model, ah=True, epsilon=1e-3), "embed.hook_out")
    _assert_same(before, _snapshot(tiny_model))
    with pytest.raises(RuntimeError, match="boom"), rules(tiny_model, ah=True, epsilon=1e-3):
        logit_diff(tiny_model(TOKENS)).backward(inputs=[tiny_model.embed.weight])
        tiny_model.embed.weight.grad = None
        raise RuntimeError("boom")
    _assert_same(before, _snapshot(tiny_model))
    assert (
        relevance(tiny_model, nullcontext(), "embed.hook_out")[0]
        == relevance(tiny_model, nullcontext(), "embed.hook_out")[0]
    )


def test_another_threads_forward_does_not_see_the_rules(tiny_model):
    plain = relevance(tiny_model, nullcontext(), "embed.hook_out")[2]
    seen = {}

    def lens():  # the app's prompt lens, on the same pooled model, while the rules are on
        seen["grad"] = relevance(tiny_model, nullcontext(), "embed.hook_out")[2]

    with rules(tiny_model, ah=True, epsilon=1e-3) as applied:
        thread = threading.Thread(target=lens)
        thread.start()
        thread.join()
        assert not applied  # the other thread's pass applied no rule
        ruled = relevance(tiny_model, nullcontext(), "embed.hook_out")[2]
    assert torch.equal(seen["grad"], plain) and not torch.allclose(ruled, plain)


def test_bad_rule_names_and_epsilon_are_one_line_errors(tiny_model):
    with pytest.raises(LRPRuleError) as err:
        check_rules(["norm", "idnetity"])
    assert str(err.value) == (
        "unknown LRP rule(s) ['idnetity']; known: ['norm', 'identity', 'half'] (plus ah=True, epsilon=...)"
    )
    with (
        pytest.raises(LRPRuleError, match=r"^epsilon must be a positive number, got 0$"),
        rules(tiny_model, epsilon=0),
    ):
        pass
    with pytest.raises(LRPRuleError) as err, rules(torch.nn.Sequential(torch.nn.Linear(2, 2)), ah=True):
        pass
    assert str(err.value) == (
        "LRP rule(s) ['norm', 'identity', 'ah'] found nothing to act on in Sequential: no TransformerBridge "
        "norm / MLP / attention module of the supported kinds"
    )
    assert isinstance(LRPRuleError("x"), ValueError)  # the CLI prints ValueErrors as `error: ...`, exit 2


def test_norm_rule_closed_form_and_the_generic_path_for_weightless_norms(gpt2_model):
    """LayerNorm: dx = centre(dy * w) / s with s held constant; a norm whose weight step is overridden
    (LNPre: no weight, no bias) is differentiated through that override: dx = centre(dy) / s."""
    ln = gpt2_model.blocks[0].ln2
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)
    xc = x - x.mean(-1, keepdim=True)
    s = (xc.pow(2).mean(-1, keepdim=True) + ln.original_component.eps).sqrt()

    def centre(t):
        return t - t.mean(-1, keepdim=True)

    (dx,) = _norm_rule(ln)(dy, x)
    torch.testing.assert_close(dx, centre(dy * ln.weight) / s)

    class Pre(type(ln)):
        def _apply_weight_and_bias(self, hidden, dtype):
            return hidden.to(dtype)

    pre = copy.copy(ln)  # shallow: shares the pooled model's parameters, changes nothing on it
    pre.__class__ = Pre
    (dx_pre,) = _norm_rule(pre)(dy, x)
    torch.testing.assert_close(dx_pre, centre(dy) / s)
    assert type(ln) is not Pre


@pytest.mark.slow
def test_smollm2_forward_unchanged_and_conserving_under_the_rules(smollm2):
    """The real model: every rule fires in every layer, the logits do not move, and with the AH rule the
    logit difference is conserved down to the token embeddings (SmolLM2 is bias-free)."""
    tokens = smollm2.to_tokens("When Mary and John went to the shops, John gave the bag to")
    plain = smollm2(tokens)
    with rules(smollm2, ah=True, epsilon=1e-6) as applied:
        ruled = smollm2(tokens)
    assert (ruled - plain).abs().max().item() == 0.0
    n = smollm2.cfg.n_layers
    assert dict(applied) == {"norm": 2 * n + 1, "identity": n, "half": n, "ah": n, "epsilon": 7 * n + 1}
    mary, john = (smollm2.to_single_token(t) for t in (" Mary", " John"))
    with grab(smollm2, ["embed.hook_out"]) as got, rules(smollm2, ah=True):
        logits = smollm2(tokens)
        metric = logits[0, -1, mary] - logits[0, -1, john]
        (grad,) = torch.autograd.grad(metric, got["embed.hook_out"])
    assert metric.item() > 1  # the model does IOI
    assert rel_err((got["embed.hook_out"] * grad).sum().item(), metric.item()) < 1e-4
