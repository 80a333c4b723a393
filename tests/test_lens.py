"""Prompt lens (workbench.lens): hook_z dictionaries, live units, attention, logit lens, Jupyter HTML."""

from __future__ import annotations

import html
import re

import pytest
import torch

TEXT = "The cat sat on the mat because it was warm"


def _sae(path, d_in: int, hook_name: str, **cfg):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=32, metadata=SAEMetadata(hook_name=hook_name), **cfg)
    )
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-0.5)
        sae.W_enc[:, 0] = 0.0  # latent 0 never fires: the lens must not open on it
    sae.save_model(str(path))
    return sae


def test_attention_head_dictionary_reads_flattened_hook_z(tiny_model, tmp_path):
    from workbench.lens import prompt_lens

    n_heads, d_head = tiny_model.cfg.n_heads, tiny_model.cfg.d_head
    sae = _sae(tmp_path / "z", n_heads * d_head, "blocks.1.attn.hook_z", reshape_activations="hook_z")
    view = prompt_lens(tiny_model, TEXT, 1, dictionary=str(tmp_path / "z"))
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(TEXT))
    z = cache["blocks.1.attn.hook_z"][0]  # [pos, n_heads, d_head]
    sae.turn_off_forward_pass_hook_z_reshaping()
    with torch.no_grad():
        expected = sae.encode(z.flatten(1))  # SAELens' hook_z convention: heads concatenated
    assert view["latent_site"] == "blocks.1.attn.hook_z"
    assert torch.allclose(torch.tensor(view["latents"]), expected, atol=1e-5)
    assert view["first_latent"] == int(expected[1:].amax(0).argmax()) != 0  # live, BOS left out


def test_alias_named_dictionary_reports_the_canonical_site(tiny_model, tmp_path):
    from workbench.lens import prompt_lens

    _sae(tmp_path / "a", tiny_model.cfg.d_model, "blocks.1.hook_out")
    view = prompt_lens(tiny_model, TEXT, 0, dictionary=str(tmp_path / "a"))
    assert view["latent_site"] == "blocks.1.hook_resid_post"


def test_attention_logit_lens_and_signed_top_neurons_match_the_model(tiny_model):
    from workbench.lens import prompt_lens

    view = prompt_lens(tiny_model, TEXT, 1, logit_k=3)
    tokens = tiny_model.to_tokens(TEXT)
    logits, cache = tiny_model.run_with_cache(tokens)
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # [n_heads, q, k]
    assert torch.allclose(torch.tensor(view["attention"]), pattern, atol=1e-5)
    assert view["bos"] is True
    # logit lens: layer 0 through ln_final and W_U by hand; the last layer is the model's prediction
    by_hand = tiny_model.unembed(tiny_model.ln_final(cache["blocks.0.hook_resid_post"]))[0, 4]
    assert [p["logit"] for p in view["logit_lens"][0][4]] == pytest.approx(
        by_hand.topk(3).values.tolist(), abs=1e-3
    )
    decode = tiny_model.tokenizer.decode
    assert [p["token"] for p in view["logit_lens"][-1][-1]] == [
        decode([i]) for i in logits[0, -1].topk(3).indices
    ]
    # top neurons: by |activation|, negative ones kept with their sign
    post = cache["blocks.1.mlp.hook_post"][0]
    idx = post[3].abs().topk(10).indices
    assert view["top_neurons"][3] == [(int(i), pytest.approx(float(post[3, i]), abs=1e-4)) for i in idx]
    assert any(a < 0 for _, a in view["top_neurons"][3])  # SwiGLU: both signs among the top
    assert view["first_neuron"] == int(post[1:].abs().amax(0).argmax())


def test_jupyter_html_has_each_token_and_value_and_leaves_bos_out_of_the_scale(tiny_model):
    import workbench as wb
    from workbench.lens import prompt_lens

    view = prompt_lens(tiny_model, TEXT, 1)
    page = view._repr_html_()  # what Jupyter displays for the lens result
    shown = re.findall(r'title="(\d+): (.*?) = ([-+\d.e]+)"', page)
    assert [int(p) for p, _, _ in shown] == list(range(len(view["tokens"])))
    assert [html.unescape(t) for _, t, _ in shown] == [repr(t) for t in view["tokens"]]
    assert [float(v) for _, _, v in shown] == pytest.approx(view["resid_norm"], rel=1e-3)
    scale = max(view["resid_norm"][1:])
    assert f"<span>{scale:.4g}</span>" in page  # the legend's top is the largest non-BOS value
    assert f"position 0 ({view['resid_norm'][0]:.4g})" in page
    signed = wb.show_tokens(["a", "b"], [-2.0, 1.0])._repr_html_()  # any values, inline in Jupyter
    assert "rgba(40,110,255,1.00)" in signed and "rgba(255,110,0,0.50)" in signed  # blue −, orange +
    assert "<span>-2</span>" in signed  # a signed legend runs from −scale
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        wb.show_tokens(["a", "b"], [1.0])
