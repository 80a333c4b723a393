"""Weight masks (workbench.masks): what is masked, parity with weights multiplied by hand, the
pooled model untouched, safetensors round trip, and the refusals' exact messages."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model_dir
from safetensors import safe_open
from safetensors.torch import save_file

from workbench import masks
from workbench.models import load_model

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
KINDS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _random_mask(model, p: float = 0.5, seed: int = 0) -> masks.MaskSet:
    gen = torch.Generator().manual_seed(seed)
    return masks.MaskSet(
        {n: torch.rand(w.shape, generator=gen) < p for n, w in masks.maskable(model).items()}
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bit_identical(model, snapshot) -> bool:
    now = dict(model.named_parameters())
    return set(now) == set(snapshot) and all(torch.equal(now[n], snapshot[n]) for n in snapshot)


def test_every_attention_and_mlp_matrix_is_maskable_and_nothing_else(tiny_model):
    names = set(masks.maskable(tiny_model))
    assert names == {f"model.layers.{i}.{k}.weight" for i in range(2) for k in KINDS}


def test_masked_forward_equals_weights_multiplied_by_hand(tiny_model, tiny_model_dir):
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = _random_mask(tiny_model)
    before = _snapshot(tiny_model)
    with torch.no_grad():
        base = tiny_model(tokens)
        with masks.apply_mask(tiny_model, mask):
            masked = tiny_model(tokens)
        after = tiny_model(tokens)
    reference = load_model(str(tiny_model_dir))  # an independent copy, multiplied in place
    with torch.no_grad():
        for name, w in masks.maskable(reference).items():
            w.mul_(mask.masks[name])
        expected = reference(tokens)
    assert torch.allclose(masked, expected, atol=1e-6, rtol=0)
    assert (masked - base).abs().max() > 1e-2  # the mask did something
    assert torch.equal(after, base)
    assert _bit_identical(tiny_model, before)


def test_parameters_restored_when_the_block_raises(tiny_model):
    params = dict(tiny_model.named_parameters())
    before = _snapshot(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with masks.apply_mask(tiny_model, _random_mask(tiny_model)):
            raise RuntimeError("boom")
    assert all(p is params[n] for n, p in tiny_model.named_parameters())  # the same Parameter objects
    assert _bit_identical(tiny_model, before)


def test_complement_and_random_like_keep_per_matrix_counts(tiny_model):
    mask = _random_mask(tiny_model, p=0.1)
    rand, comp = mask.random_like(seed=3), mask.complement()
    for name, m in mask.masks.items():
        assert int(rand.masks[name].sum()) == int(m.sum())
        assert not (rand.masks[name] == m).all()
        assert int(comp.masks[name].sum()) == m.numel() - int(m.sum())
    assert mask.kept() + comp.kept() == mask.total()


def test_save_load_round_trip_is_bit_identical(tiny_model, tmp_path):
    mask = _random_mask(tiny_model, p=0.01)
    path = masks.save_mask(tmp_path / "m.safetensors", mask, tiny_model, lam=10.0, steps_done=7)
    loaded = masks.load_mask(path, tiny_model)
    assert set(loaded.masks) == set(mask.masks)
    assert all(torch.equal(loaded.masks[n], mask.masks[n]) for n in mask.masks)
    info = tiny_model.workbench
    assert loaded.meta["model_key"] == info.key and loaded.meta["weights_hash"] == info.weights_hash
    assert loaded.meta["lam"] == "10.0" and loaded.meta["steps_done"] == "7"
    with safe_open(str(path), "pt") as f:  # HF parameter names and bool storage, readable without us
        assert set(f.keys()) == set(mask.masks)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bool


def test_mask_of_another_model_is_refused(tiny_model, tiny_models_root, tmp_path):
    path = masks.save_mask(tmp_path / "m.safetensors", _random_mask(tiny_model), tiny_model, lam=1.0)
    other = load_model(str(make_tiny_model_dir(tiny_models_root / "other", "llama", seed=5)))
    mine, theirs = tiny_model.workbench, other.workbench
    with pytest.raises(masks.MaskError) as err:
        masks.load_mask(path, other)
    assert str(err.value) == (
        f"mask file was trained on {mine.key} (weights {mine.weights_hash[:8]}…); "
        f"this model is {theirs.key} (weights {theirs.weights_hash[:8]}…)"
    )


def test_mask_of_another_shape_is_refused(tiny_model, tmp_path):
    good = masks.save_mask(tmp_path / "m.safetensors", _random_mask(tiny_model), tiny_model)
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].T.contiguous()  # [64, 128] where the model has [128, 64]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(masks.MaskError) as err:
        masks.load_mask(tmp_path / "bad.safetensors", tiny_model)
    assert str(err.value) == f"mask for {name} has shape [64, 128]; the model's is [128, 64]"


def test_not_a_mask_file_is_one_line(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(masks.MaskError, match="is not a workbench mask file"):
        masks.read_mask(tmp_path / "w.safetensors")
    with pytest.raises(masks.MaskError, match="not found"):
        masks.read_mask(tmp_path / "missing.safetensors")


def test_compat_mode_is_refused(tiny_model_dir):
    compat = load_model(str(tiny_model_dir), processing="compat")
    with pytest.raises(masks.MaskError) as err:
        masks.maskable(compat)
    assert str(err.value) == (
        "weight masks need the raw weights: this model was loaded with processing='compat' (folded "
        "norms and centred weights would mix masked and kept entries); load it with processing='raw'"
    )


def test_api_loads_a_mask_onto_the_pooled_model_in_one_call(tiny_model, tiny_model_dir, tmp_path):
    import workbench as wb
    from workbench.context import POOL

    POOL.put(tiny_model)
    mask = _random_mask(tiny_model)
    path = masks.save_mask(tmp_path / "m.safetensors", mask, tiny_model)
    tokens = torch.arange(10)[None]
    with torch.no_grad(), masks.apply_mask(tiny_model, mask):
        expected = tiny_model(tokens)
    with torch.no_grad(), wb.masked(path, model=str(tiny_model_dir)) as model:
        assert model is tiny_model
        assert torch.equal(model(tokens), expected)
    assert json.loads(wb.load_mask(path, model=str(tiny_model_dir)).meta["shapes"])
