"""Factual-recall tracing on a tiny GPT-2 with a planted lookup, and the exactness of batching.

The planted model (4 layers, everything else zero): the subject's last token " Tower" carries e0;
the MLP of layer 1 fires on e0 and writes e1 (a "found" key) and e2 (the attribute " Paris", whose
unembedding is 4 e2); attention head 0 of layer 2 attends from every position to the token
carrying e1 and copies its e2. The prompt's last token " of" carries 5 e3, so noise leaking into
e2 at the subject stays small at the last position.
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench import api
from workbench import facts as F
from workbench.analyses.factual import aggregate, mechanisms, tracing
from workbench.context import POOL

PROMPT, SUBJECT, ATTRIBUTE = "The Moon Tower is in the city of", "Moon Tower", "Paris"


def _planted_dir(root):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tests.conftest import GPT2_TOKENIZER

    folder = root / "planted"
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=4,
        n_head=4,
        n_positions=64,
        activation_function="gelu_new",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    d = 64
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name:
                p.zero_() if not name.endswith(("ln_1.weight", "ln_2.weight")) else p.fill_(1.0)
        t = model.transformer
        t.wte.weight.normal_(0, 0.02)[:, :3] = 0
        t.wpe.weight.normal_(0, 0.02)[:, :3] = 0
        ids = {w: tok.encode(w)[0] for w in (" Tower", " of", " Paris")}
        t.wte.weight[ids[" Tower"], 0] = 1.0
        t.wte.weight[ids[" of"], 3] = 5.0
        model.lm_head.weight.normal_(0, 0.02)[:, :4] = 0  # untied: " of" is not read out along e3
        model.lm_head.weight[ids[" Paris"], 2] = 4.0
        mlp = t.h[1].mlp
        mlp.c_fc.weight[0, 0], mlp.c_fc.bias[0] = 1.0, -5.0
        mlp.c_proj.weight[0, 1] = mlp.c_proj.weight[0, 2] = 1.0
        attn = t.h[2].attn  # head 0: q = constant bias, k and v read e1 and e2, output writes e2
        attn.c_attn.bias[0] = 2.4
        attn.c_attn.weight[1, d] = 2.4
        attn.c_attn.weight[2, 2 * d] = 1.0
        attn.c_proj.weight[0, 2] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    return _planted_dir(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def planted(planted_dir):
    from workbench.models import load_model

    return load_model(str(planted_dir))


@pytest.fixture(scope="module")
def fact(planted):
    return F.prepare(F.Fact(SUBJECT, PROMPT, ATTRIBUTE, 1), planted)


@pytest.fixture(scope="module")
def maps(planted, fact):
    tracer = _tracer(planted, fact)
    states = tracing.all_states(4, len(fact.tokens), fact.start, severed=True)
    return tracer, tracing.to_maps(tracer, states, tracing.trace(tracer, states, 16), severed=True)


def _tracer(model, p, samples=10):
    sigma = tracing.subject_std(model, [p])
    return tracing.Tracer(model, p.tokens, p.start, p.end, p.target, 3 * sigma, samples, 1, window=1)


def test_planted_model_knows_the_fact_and_noise_destroys_it(planted, fact):
    assert fact.labels[fact.start : fact.end] == [" Moon", " Tower"]
    assert F.split_known(planted, [fact])[0] == [fact]
    tracer = _tracer(planted, fact)
    assert tracer.p_clean > 0.99 and tracer.p_corrupted < 0.05


def test_tracing_peaks_at_the_planted_mlp_and_last_subject_token(maps, fact):
    tracer, m = maps
    ie = m - tracer.p_corrupted
    te = tracer.p_clean - tracer.p_corrupted
    last_subject, last = fact.end - 1, len(fact.tokens) - 1
    mlp = ie[tracing.KINDS.index("mlp")]
    assert divmod(int(mlp.argmax()), mlp.shape[1]) == (1, last_subject)
    assert float(mlp[1, last_subject]) > 0.9 * te
    others = mlp.clone()
    others[1, last_subject] = 0
    assert float(others.abs().max()) < 0.05 * te  # no other MLP state matters
    attn = ie[tracing.KINDS.index("attn")]
    assert divmod(int(attn.argmax()), attn.shape[1]) == (2, last)  # the mover head's layer, last token
    hidden = ie[0]
    assert float(hidden[0, last_subject]) > 0.9 * te and float(hidden[3, last]) > 0.9 * te
    assert float(hidden[0, fact.start]) < 0.05 * te  # the first subject token carries nothing


def test_severing_the_mlp_removes_the_early_peak(maps, fact):
    tracer, m = maps
    ie = m - tracer.p_corrupted
    te = tracer.p_clean - tracer.p_corrupted
    s = fact.end - 1
    mlp_severed, attn_severed = ie[3], ie[4]
    assert float(ie[0, 0, s]) > 0.9 * te
    assert float(mlp_severed[0, s]) < 0.05 * te  # before the planted MLP: its output stays corrupted
    assert float(mlp_severed[1, s]) > 0.9 * te  # after it: the restored state already holds its output
    assert float(attn_severed[0, s]) > 0.9 * te  # freezing attention at the subject changes nothing here


def test_batched_restoration_equals_one_state_per_forward(planted, fact):
    """The batched sweep and the paper's one-restoration-per-forward loop give the same numbers."""
    tracer = _tracer(planted, fact, samples=3)
    states = tracing.all_states(4, len(fact.tokens), 0, severed=True)  # pre-subject states skip their pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded CPU kernels may sum in a batch-size dependent order
    try:
        batched = tracing.trace(tracer, states, max_states=7)
        reference = tracing.reference_probs(tracer, states)
    finally:
        torch.set_num_threads(threads)
    # equal up to float32 rounding: the same rows in batches of another size (measured max |diff| ~1e-8)
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-6)
    assert batched.std() > 0.1  # not trivially equal: the states differ


def test_batched_restoration_is_exact_on_a_random_gated_model(tiny_model):
    """Every weight nonzero (a random Llama: gated MLP, RMS norm, GQA), a subject after the first
    token, window 2: the batched sweep, whose MLPs run only where a state can change them, equals
    the one-state-per-forward loop; and the MLPs did skip work (fewer rows than the full batch)."""
    p = F.prepare(F.Fact("Eiffel Tower", "The Eiffel Tower is in the city of", "Paris", 1), tiny_model)
    n_layers = tiny_model.cfg.n_layers
    tracer = tracing.Tracer(tiny_model, p.tokens, p.start, p.end, p.target, 0.5, 3, 1, window=2)
    states = tracing.all_states(n_layers, len(p.tokens), p.start, severed=True)
    seen: list[int] = []
    down = tiny_model.blocks[n_layers - 1].mlp.original_component.down_proj  # rows the MLP computes
    counting = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched = tracing.trace(tracer, states, max_states=5)
        reference = tracing.reference_probs(tracer, states)
    finally:
        torch.set_num_threads(threads)
        counting.remove()
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=0)  # P(target) ~2e-5 here: relative
    assert (batched.max() - batched.min()) / batched.mean() > 0.01  # the states differ
    full = 3 * len(states) * len(p.tokens) + len(states) * 3 * len(p.tokens)  # batched rows + reference rows
    assert sum(seen) < full


def test_dla_names_the_planted_components_and_sums_to_the_logit(planted, fact):
    cache = mechanisms.clean_cache(planted, fact.tokens)
    got = mechanisms.dla(planted, cache, fact.target)
    assert divmod(int(got["mlp"].argmax()), got["mlp"].shape[1]) == (1, fact.end - 1)
    heads = got["heads"]
    assert divmod(int(heads.argmax()), 4) == (2, 0)
    assert float(heads[2, 0]) > 0.9 * float(cache["logits"][fact.target])
    total = got["embed"][-1] + got["attn"][:, -1].sum() + got["mlp"][:, -1].sum() + got["rest"]
    torch.testing.assert_close(total, cache["logits"][fact.target], rtol=1e-4, atol=1e-4)


def test_dla_sums_to_the_logit_on_a_gated_rms_model(tiny_model):
    p = F.prepare(F.Fact("Eiffel Tower", "The Eiffel Tower is in the city of", "Paris", 1), tiny_model)
    cache = mechanisms.clean_cache(tiny_model, p.tokens)
    got = mechanisms.dla(tiny_model, cache, p.target)
    total = got["embed"][-1] + got["attn"][:, -1].sum() + got["mlp"][:, -1].sum() + got["rest"]
    torch.testing.assert_close(total, cache["logits"][p.target], rtol=1e-4, atol=1e-4)
    heads = got["heads"].sum(1)  # + b_O (zero in Llama) = the attention output's DLA
    torch.testing.assert_close(heads, got["attn"][:, -1], rtol=1e-4, atol=1e-5)


def test_path_patching_finds_the_mover_head(planted, fact):
    cache = mechanisms.clean_cache(planted, fact.tokens)
    zeros = torch.zeros(4, 4, 16)  # mean over an empty context: ablating to zero
    effect = mechanisms.path_patch(planted, fact.tokens, fact.target, cache, zeros, max_rows=5)
    assert divmod(int(effect.argmin()), 4) == (2, 0)
    assert float(effect[2, 0]) < -10
    effect[2, 0] = 0
    assert float(effect.abs().max()) < 1e-4  # the other heads are zero: ablating them changes nothing
    attn = mechanisms.attention_to_subject(planted, cache, fact.start, fact.end)
    assert float(attn[2, 0]) > 0.95  # the mover attends from the last token to the subject


def test_token_types_and_aie():
    assert aggregate.type_positions(2, 5, 9) == [[2], [3], [4], [5], [6, 7], [8]]
    assert aggregate.type_positions(1, 2, 3) == [[1], [], [1], [], [], [2]]
    per_fact = torch.tensor([[1.0, float("nan")], [3.0, 2.0]])[:, None, :, None]  # [fact, kind, type, layer]
    mean, ci = aggregate.aie(per_fact)
    assert mean[0, :, 0].tolist() == [2.0, 2.0]
    assert abs(float(ci[0, 0, 0]) - 1.96 * 2**0.5 / 2**0.5) < 1e-6 and ci[0, 1, 0].isnan()


def test_analysis_on_the_planted_model(planted, planted_dir, tmp_path):
    """The registered analysis end to end: a fact file with an unknown fact (skipped and counted),
    the early and late sites, the planted head by DLA, a cache hit and a loaded copy."""
    POOL.put(planted)
    rows = [
        {"subject": SUBJECT, "prompt": p, "attribute": ATTRIBUTE}
        for p in (PROMPT, "A Moon Tower is in the city of")
    ]
    rows.insert(1, {"subject": "Moon", "prompt": "The Moon is in the city of", "attribute": "Paris"})
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    opts = dict(model=str(planted_dir), facts=str(path), n_facts=0, samples=4, max_batch_tokens=512)
    result = api.run("factual", **opts)
    assert [r["row"] for r in result.rows] == [1, 3] and [u["row"] for u in result.unknown] == [2]
    assert result.n_checked == 3 and abs(result.known_fraction() - 2 / 3) < 1e-9
    sites = result.sites()
    assert sites["early"]["present"] and sites["early"]["layer"] == 1
    assert sites["late"]["present"] and sites["late"]["layer"] == 2
    assert result.top_dla_heads(1)[0]["head"] == "2.0"
    assert result.mech["suppression"].shape == (2, 2)
    assert api.run("factual", **opts).cache_key == result.cache_key
    loaded = api.load(result.cache_key)
    assert torch.equal(loaded.traces.nan_to_num(-1), result.traces.nan_to_num(-1))
