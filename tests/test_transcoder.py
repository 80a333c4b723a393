"""Transcoders read the MLP's true input (issue 13 item 10).

A tiny Llama whose RMSNorm weights γ are random (≠ 1): `blocks.1.mlp.hook_in` (after γ) is what
`gate_proj` reads; `ln2.hook_normalized` (before γ) is not. With γ = 1 (the default tiny model)
the two are equal, which is how a transcoder trained on the wrong site once passed its check.
"""

from __future__ import annotations

import pytest
import torch

from workbench import api
from workbench.sae.archs import ArchSpec, build
from workbench.sae.io import load_dictionary, save_dictionary
from workbench.sae.transcoder import check_input_site, mlp_input_site, mlp_output_site

L = 1
MLP_IN, PRE_GAMMA = f"blocks.{L}.mlp.hook_in", f"blocks.{L}.ln2.hook_normalized"
HOOK_PRE, MLP_OUT = f"blocks.{L}.mlp.hook_pre", f"blocks.{L}.hook_mlp_out"
CTX = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny Llama with ln1/ln2 weights γ ~ U(0.2, 3) instead of 1."""
    from conftest import make_tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.models import load_model

    root = tmp_path_factory.mktemp("gamma")
    src = make_tiny_model_dir(root, "llama", seed=2)
    hf = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in hf.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.2 + 2.8 * torch.rand(norm.weight.shape, generator=g))
    hf.save_pretrained(root / "gamma")
    AutoTokenizer.from_pretrained(src).save_pretrained(root / "gamma")
    return load_model(str(root / "gamma"))


@pytest.fixture(scope="module")
def store(model, wikitext, tmp_path_factory):
    from workbench.capture import CaptureConfig, capture
    from workbench.context import POOL

    POOL.put(model)  # analyses find the model instead of booting it again
    sites = (MLP_IN, PRE_GAMMA, HOOK_PRE, MLP_OUT)
    cfg = CaptureConfig(
        model=str(model.workbench.key), sites=sites, data=wikitext, n_tokens=1024, ctx_len=CTX
    )
    return capture(cfg, model=model, out=tmp_path_factory.mktemp("store") / "run", progress=False)


def test_site_names():
    assert mlp_input_site(15) == "blocks.15.mlp.hook_in"
    assert mlp_output_site("blocks.15.mlp.hook_in") == "blocks.15.hook_mlp_out"
    assert mlp_output_site("blocks.3.ln2.hook_out") == "blocks.3.hook_mlp_out"
    assert mlp_output_site("ln_final.hook_normalized") == ""


def test_stored_mlp_input_through_gate_proj_is_hook_pre(model, store):
    """gate_proj(stored mlp.hook_in) == stored mlp.hook_pre; of the pre-γ site it is not."""
    gamma = model.blocks[L].ln2.original_component.weight
    assert (gamma - 1).abs().max() > 0.5  # the premise: a non-trivial norm weight
    gate = model.blocks[L].mlp.original_component.gate_proj
    pre = store.read(HOOK_PRE)
    with torch.no_grad():
        right = (gate(store.read(MLP_IN)) - pre).abs().max().item()
        wrong = (gate(store.read(PRE_GAMMA)) - pre).abs().max().item()
    print(f"\nmax |gate_proj(site) - hook_pre|: mlp.hook_in {right:.2e}, ln2.hook_normalized {wrong:.3f}")
    assert right < 1e-5, right
    assert wrong > 0.1, wrong


def test_train_sae_defaults_to_the_mlp_input(store):
    res = api.run("train-sae", store=str(store.root), arch="transcoder", d_sae=32, batch_size=64, steps=3)
    assert (res.site, res.target_site) == (MLP_IN, MLP_OUT)
    meta = load_dictionary(res.dictionary).cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == (MLP_IN, MLP_OUT)


def test_pre_gamma_input_is_refused_in_raw_mode(store):
    msg = (
        f"'{PRE_GAMMA}' is taken before the norm's weight γ, so it is not what the MLP reads in raw "
        f"mode; train the transcoder on '{MLP_IN}'"
    )
    with pytest.raises(ValueError) as err:
        api.run("train-sae", store=str(store.root), arch="transcoder", site=PRE_GAMMA, batch_size=64, steps=1)
    assert str(err.value) == msg
    check_input_site(PRE_GAMMA, "compat")  # folded norms: γ lives in the MLP's weights, no refusal
    check_input_site(MLP_IN, "raw")


def _planted_gate_transcoder(model, hook_in: str, folder):
    """W_enc = [Gᵀ, −Gᵀ], W_dec = [I; −I] (G = gate_proj): ReLU(Gx) − ReLU(−Gx) = Gx, so the
    transcoder equals hook_pre exactly when it reads the MLP's input."""
    G = model.blocks[L].mlp.original_component.gate_proj.weight.detach()  # [d_mlp, d_model]
    d_mlp, d_model = G.shape
    meta = {"hook_name": hook_in, "hook_name_out": HOOK_PRE}
    tc = build(ArchSpec("transcoder", d_model, 2 * d_mlp, d_out=d_mlp), meta)
    eye = torch.eye(d_mlp)
    with torch.no_grad():
        tc.W_enc.copy_(torch.cat([G.T, -G.T], 1))
        tc.W_dec.copy_(torch.cat([eye, -eye], 0))
        tc.b_enc.zero_()
        tc.b_dec.zero_()
    return str(save_dictionary(tc, folder))


def test_sae_eval_splices_the_mlp_input(model, store, tmp_path):
    """sae-eval reads the dictionary's input site, stored and live: a planted transcoder
    mlp.hook_in -> mlp.hook_pre is exact (FVU 0, spliced CE = clean CE); the same weights on the
    pre-γ site are not."""
    right = _planted_gate_transcoder(model, MLP_IN, tmp_path / "right")
    wrong = _planted_gate_transcoder(model, PRE_GAMMA, tmp_path / "wrong")
    res = api.run("sae-eval", dictionary=f"{right},{wrong}", store=str(store.root), n_tokens=512, n_seqs=4)
    r, w = res.table
    print(
        f"\nplanted gate transcoder: FVU {r['fvu']:.2e} / KL {r['kl_div_with_sae']:.2e} (mlp.hook_in), "
        f"{w['fvu']:.3f} / {w['kl_div_with_sae']:.2e} (pre-γ)"
    )
    assert r["fvu"] < 1e-9 and w["fvu"] > 0.05, (r["fvu"], w["fvu"])
    assert r["ce_loss_with_sae"] == pytest.approx(r["ce_loss_without_sae"], abs=1e-5)
    assert r["kl_div_with_sae"] < 1e-8 and w["kl_div_with_sae"] > 1e-4
