"""Activation patching, AtP, RelP wiring and IG against independent computations on tiny models."""

import pytest
import torch

from tests.conftest import make_tiny_model_dir
from workbench import tasks
from workbench.analyses.patching import compute
from workbench.analyses.patching.activation import sweep
from workbench.analyses.patching.attribution import gradients
from workbench.analyses.patching.components import Patch, parse_heads
from workbench.analyses.patching.metrics import PromptMetric, logit_diff
from workbench.models import load_model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tiny_models_root):
    return load_model(str(make_tiny_model_dir(tiny_models_root, request.param)))


@pytest.fixture(scope="module")
def group(model):
    # Two pairs of one template (ABBA, BABA): one length group, S2 differs between clean and corrupted.
    tt = tasks.tokenize(tasks.load_task("ioi", 2, seed=3), model)
    assert len(tt.groups) == 1
    return tt.groups[0]


def _cache(model, tokens, names):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def _ld(model, tokens, group, hooks=()):
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks))
    return logit_diff(logits[:, -1], group.answer, group.wrong)


def _replace(source, index):
    def hook(x, hook):
        x = x.clone()
        x[(slice(None), *index)] = source[(slice(None), *index)]
        return x

    return hook


PATCHES = [
    Patch("resid_pre", 1, -5, None),
    Patch("attn_out", 1, -1, None),
    Patch("mlp_out", 0, -5, None),
    Patch("heads", 1, None, 2),
    Patch("heads_pos", 1, -1, 3),
]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_ap_equals_a_hand_written_run_with_hooks_replacement(model, group, direction):
    base, src = (group.corrupted, group.clean) if direction == "denoise" else (group.clean, group.corrupted)
    rows = torch.arange(len(base))
    names = sorted({p.hook for p in PATCHES})
    src_acts, base_acts = _cache(model, src, names), _cache(model, base, names)
    metric = PromptMetric("logit_diff", group.answer, group.wrong)
    base_ld = _ld(model, base, group)
    effects, _ = sweep(
        model, base, src_acts, base_acts, PATCHES, metric, metric_values(model, base, metric), 64
    )
    for patch, got in zip(PATCHES, effects):
        want = _ld(model, base, group, [(patch.hook, _replace(src_acts[patch.hook], patch.index))]) - base_ld
        assert got.abs().max() > 1e-6  # a real effect, not two zeros
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert rows.numel() == 2


def metric_values(model, tokens, metric):
    with torch.no_grad():
        logits = model(tokens)
    return metric(logits[:, -1], torch.arange(len(tokens)))


def test_batched_sweep_equals_one_patch_at_a_time(model, group):
    heads = parse_heads("all", model.cfg.n_layers, model.cfg.n_heads)
    from workbench.analyses.patching.components import patches

    T = group.clean.shape[1]
    patch_list = [p for c in ("resid_pre", "attn_out", "mlp_out", "heads") for p in patches(c, 2, T, heads)]
    names = sorted({p.hook for p in patch_list})
    clean, corr = _cache(model, group.clean, names), _cache(model, group.corrupted, names)
    metric = PromptMetric("logit_diff", group.answer, group.wrong)
    base = metric_values(model, group.corrupted, metric)
    batched, calls = sweep(model, group.corrupted, clean, corr, patch_list, metric, base, max_rows=10_000)
    single, single_calls = sweep(model, group.corrupted, clean, corr, patch_list, metric, base, max_rows=1)
    assert calls == 1 and single_calls > 10  # one forward pass vs one per (non-trivial) patch
    assert torch.equal(batched, single)
    # Patches before the first differing token are exact no-ops (causality), never run.
    first_diff = int((group.clean != group.corrupted).any(0).nonzero()[0])
    early = [i for i, p in enumerate(patch_list) if p.pos is not None and p.pos < first_diff]
    assert early and batched[early].abs().max() == 0


def test_atp_equals_the_product_with_a_separate_autograd_gradient(model, group):
    names = [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.1.attn.hook_z",
    ]
    metric = PromptMetric("logit_diff", group.answer, group.wrong)
    rows = torch.arange(len(group.corrupted))
    got = gradients(model, group.corrupted, names, metric, rows)
    # Independent: retain_grad on each activation, loss.backward(), read .grad.
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x
        return x

    canonical = {n: model.hook_dict[n].name for n in names}
    logits = model.run_with_hooks(group.corrupted, fwd_hooks=[(n, keep) for n in names])
    logit_diff(logits[:, -1], group.answer, group.wrong).sum().backward()
    model.zero_grad(set_to_none=True)
    clean, corr = _cache(model, group.clean, names), _cache(model, group.corrupted, names)
    for n in names:
        want = acts[canonical[n]].grad
        assert want.abs().max() > 0
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            (clean[n] - corr[n]) * got[n], (clean[n] - corr[n]) * want, rtol=1e-5, atol=1e-7
        )


def test_atp_equals_ap_where_the_map_to_the_metric_is_linear(model, group):
    # The final norm's output reaches the logit difference through the unembedding only: linear.
    hook = "ln_final.hook_out"
    T = group.clean.shape[1]
    patch_list = [Patch("final", 0, p, None, hook) for p in range(T)]
    clean, corr = _cache(model, group.clean, [hook]), _cache(model, group.corrupted, [hook])
    metric = PromptMetric("logit_diff", group.answer, group.wrong)
    base = metric_values(model, group.corrupted, metric)
    ap, _ = sweep(model, group.corrupted, clean, corr, patch_list, metric, base, 1000)
    grad = gradients(model, group.corrupted, [hook], metric, torch.arange(len(base)))[hook]
    atp = ((clean[hook] - corr[hook]) * grad).sum(-1).T  # [pos, batch]
    assert ap[-1].abs().min() > 1e-3  # the last position carries the whole effect
    torch.testing.assert_close(ap, atp, rtol=1e-4, atol=1e-5)


def _options(model, **kw):
    heads = parse_heads("all", model.cfg.n_layers, model.cfg.n_heads)
    base = {
        "components": ("resid_pre", "attn_out", "mlp_out", "heads"),
        "methods": ("atp", "relp"),
        "heads": heads,
    }
    return compute.Options(**{**base, "metric": "logit_diff", **kw})


def test_relp_with_no_rules_is_atp_and_with_rules_changes_only_the_backward(model):
    tt = tasks.tokenize(tasks.load_task("ioi", 2, seed=3), model)
    plain = compute.run_task(model, tt, _options(model, relp_rules=()))
    for key in plain.scores:
        if key.startswith("relp/"):
            assert torch.equal(plain.scores[key], plain.scores[key.replace("relp", "atp")])
    ruled = compute.run_task(model, tt, _options(model))
    assert ruled.baselines == plain.baselines  # forward values unchanged
    assert torch.equal(ruled.scores["atp/mlp_out"], plain.scores["atp/mlp_out"])
    assert not torch.allclose(ruled.scores["relp/resid_pre"], ruled.scores["atp/resid_pre"])


def test_ig_with_one_step_is_the_gradient_at_the_path_midpoint(model):
    tt = tasks.tokenize(tasks.load_task("ioi", 2, seed=3), model)
    out = compute.run_task(model, tt, _options(model, methods=("ig", "atp"), ig_steps=4))
    assert out.cost["ig"]["backward"] == 4 and out.cost["atp"]["backward"] == 1
    # IG and AtP agree in sign structure on these tiny models but are different numbers.
    assert not torch.equal(out.scores["ig/resid_pre"], out.scores["atp/resid_pre"])
    # Completeness (IG's axiom) at the embedding-fed first layer: sum of resid_pre[0] scores
    # = metric(clean) - metric(corrupted), up to the midpoint rule's error.
    g = tt.groups[0]
    metric = PromptMetric("logit_diff", g.answer, g.wrong)
    gap = metric_values(model, g.clean, metric) - metric_values(model, g.corrupted, metric)
    total = out.scores["ig/resid_pre"][:, 0].sum(-1)
    torch.testing.assert_close(total, gap, rtol=0.1, atol=0.05 * float(gap.abs().max()))


def test_weights_unchanged_after_a_run_and_a_failing_run(model, monkeypatch):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tt = tasks.tokenize(tasks.load_task("ioi", 2, seed=3), model)
    compute.run_task(model, tt, _options(model, methods=("ap", "atp", "relp", "ig"), ig_steps=2))

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(compute, "integrated_gradients", boom)
    with pytest.raises(RuntimeError, match="boom"):
        compute.run_task(model, tt, _options(model, methods=("atp", "ig")))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    leftover = [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert leftover == []


def test_patching_the_only_differing_embedding_is_the_clean_run(model):
    tt = tasks.tokenize(tasks.load_task("ioi", 2, seed=3), model)
    out = compute.run_task(model, tt, _options(model, methods=("ap",), metric="normalized"))
    row0 = out.scores["ap/resid_pre"].mean(0)[0]  # layer 0 = the token embeddings
    assert row0.count_nonzero() == 1  # every other position is an identical value: exactly 0
    assert float(row0.max()) == pytest.approx(1.0, abs=1e-3)  # M = 1 on the clean run


@pytest.mark.slow
def test_smollm2_does_ioi_and_relp_tracks_ap_on_the_residual_stream(smollm2):
    from workbench import api
    from workbench.context import POOL

    POOL.put(smollm2)
    r = api.run("patching", n_prompts=2, methods="ap,atp,relp", components="resid_pre")
    assert r.baselines["ld_clean"] > 1 and r.baselines["ld_corrupted"] < -1  # IOI solved, swap flips it
    assert r.pearson()["relp"]["resid_pre"] > 0.9
    # Only the subject token differs: patching its embedding (resid_pre of layer 0) IS the clean
    # run, so that one cell is exactly M = 1 and every other layer-0 cell exactly 0.
    row0 = r.map("ap", "resid_pre")[0]
    assert row0.count_nonzero() == 1 and float(row0.max()) == pytest.approx(1.0, abs=1e-4)
