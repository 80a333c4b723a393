"""SAELens round trip with the identity right: cfg.json names the model's HF id and its weight
processing (no absolute paths), every architecture loads in plain SAELens, top-AFA loads after only
`import workbench`, and a dictionary of another width, model or processing is refused with one line
before any compute in sae-eval, dashboards, patching --dictionary and the prompt lens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import api
from workbench.context import POOL, Context
from workbench.sae.archs import ARCHS, ArchSpec, build
from workbench.sae.compat import PROCESSING_KWARGS, DictionaryMismatchError, identity_metadata, processing_of
from workbench.sae.io import save_dictionary

SITE = "blocks.0.hook_resid_post"
SMOL = {"model": "smollm2-135m", "processing": "compat", "ctx_len": 128, "bos": "prepend"}
SAVED_AS = {"batchtopk": "jumprelu", "mp": "matching_pursuit"}  # training class -> inference class


def _smol_metadata(workbench_home: Path, arch: str) -> dict:
    root = workbench_home / "stores" / "smollm2-L15-1M"
    meta = identity_metadata(SMOL | {"data": "/work/shared/data/wiki.test.raw"}, root)
    if arch == "transcoder":
        return meta | {"hook_name": "blocks.0.mlp.hook_in", "hook_name_out": "blocks.0.hook_mlp_out"}
    return meta | {"hook_name": SITE}


def test_identity_metadata_names_the_hf_id_processing_and_relative_store(workbench_home, tiny_model_dir):
    meta = _smol_metadata(workbench_home, "topk")
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["model_from_pretrained_kwargs"] == {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": True,
        "fold_value_biases": True,
    }
    assert meta["dataset_path"] == "wiki.test.raw" and meta["context_size"] == 128 and meta["prepend_bos"]
    assert meta["workbench"] == {"model": "smollm2-135m", "processing": "compat", "bos": "prepend", "store": "smollm2-L15-1M"}  # fmt: skip
    # a local model folder and a store outside the stores folder: names, never absolute paths
    local = identity_metadata({"model": str(tiny_model_dir), "data": "hf:wikitext"}, tiny_model_dir / "s")
    assert (
        local["model_name"] == local["workbench"]["model"] == "llama" and local["workbench"]["store"] == "s"
    )
    assert (
        local["model_from_pretrained_kwargs"] == PROCESSING_KWARGS["raw"]
        and local["dataset_path"] == "hf:wikitext"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_in_plain_saelens_with_its_identity(arch, workbench_home, tmp_path):
    from sae_lens import SAE

    spec = ArchSpec(arch, 16, 32, d_out=16 if arch == "transcoder" else 0, k=4)
    folder = save_dictionary(build(spec, _smol_metadata(workbench_home, arch)), tmp_path / arch)
    text = (folder / "cfg.json").read_text()
    assert str(tmp_path) not in text and str(workbench_home) not in text and "/work/" not in text
    assert json.loads(text)["architecture"] == SAVED_AS.get(arch, arch)
    sae = SAE.load_from_disk(folder)  # plain SAELens, no workbench loader
    assert sae.cfg.architecture() == SAVED_AS.get(arch, arch)
    assert sae.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert processing_of(sae) == "compat" and sae.cfg.d_in == 16 and sae.cfg.d_sae == 32


def test_top_afa_loads_after_only_import_workbench(tmp_path):
    """A fresh interpreter: `import workbench` must not import SAELens, yet SAELens' own loader and the
    prompt lens's must know top_afa afterwards."""
    folder = save_dictionary(build(ArchSpec("top_afa", 16, 32, k=4), {"hook_name": SITE}), tmp_path / "afa")
    code = (
        "import sys, workbench\n"
        "print('eager', 'sae_lens' in sys.modules)\n"
        "from sae_lens import SAE\n"
        f"print('saelens', type(SAE.load_from_disk({str(folder)!r})).__name__)\n"
        "from workbench.lens import load_dictionary\n"
        f"print('lens', type(load_dictionary({str(folder)!r})).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=os.environ.copy()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["eager False", "saelens TopAFASAE", "lens TopAFASAE"]


# --- the guard: one readable line before any compute -----------------------------------------


@pytest.fixture(scope="module")
def stores(tiny_model, tiny_model_dir, wikitext, tmp_path_factory):
    """A raw and a compat store of the tiny model at SITE (module-scoped: captured once)."""
    from workbench.capture import CaptureConfig, capture
    from workbench.models import load_model

    out = {}
    for processing in ("raw", "compat"):
        model = tiny_model if processing == "raw" else load_model(str(tiny_model_dir), "compat")
        cfg = CaptureConfig(
            model=str(tiny_model_dir),
            sites=(SITE,),
            data=wikitext,
            n_tokens=128,
            ctx_len=32,
            processing=processing,
        )
        out[processing] = capture(cfg, model=model, out=tmp_path_factory.mktemp(processing), progress=False)
    return out


def _dictionary(tmp_path, store, d_in: int = 64, **config) -> str:
    """A TopK dictionary trained (by its cfg) on `store`, whose config `config` overrides."""
    meta = identity_metadata(store.config | config, store.root) | {"hook_name": SITE}
    return str(save_dictionary(build(ArchSpec("topk", d_in, 2 * d_in, k=4), meta), tmp_path / "d"))


@pytest.fixture
def no_compute(monkeypatch):
    """Any model load or stored-activation pass fails the test: the guard must come first."""
    from workbench.analyses import sae_eval
    from workbench.analyses.dashboards import compute

    monkeypatch.setattr(Context, "model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sae_eval, "_stored_metrics", lambda *a, **k: pytest.fail("sae-eval computed"))
    monkeypatch.setattr(compute, "store_batches", lambda *a, **k: pytest.fail("dashboards computed"))


def test_raw_trained_sae_is_refused_on_a_compat_store(stores, tmp_path, no_compute):
    path, compat = _dictionary(tmp_path, stores["raw"]), stores["compat"]
    expected = (
        f"dictionary {path} was trained on 'raw' activations (weight processing), but store "
        f"{compat.root} holds 'compat' ones; capture a store with --processing raw"
    )
    for analysis in ("sae-eval", "dashboards"):
        with pytest.raises(DictionaryMismatchError) as err:
            api.run(analysis, store=str(compat.root), dictionary=path)
        assert str(err.value) == expected


def test_width_and_model_mismatches_are_refused_before_compute(stores, tmp_path, no_compute):
    raw = stores["raw"]
    narrow = _dictionary(tmp_path / "w", raw, d_in=32)
    with pytest.raises(DictionaryMismatchError) as err:
        api.run("sae-eval", store=str(raw.root), dictionary=narrow)
    assert str(err.value) == (
        f"dictionary {narrow} reads {SITE} with width 32, but store {raw.root} has width 64 there; "
        "it was trained on another model or site"
    )
    from click.testing import CliRunner

    from workbench.cli import cli

    out = CliRunner().invoke(cli, ["sae-eval", "--store", str(raw.root), "--dictionary", narrow])
    assert out.exit_code == 2 and out.output.strip() == f"error: {err.value}"  # one line, no traceback
    smol = _dictionary(tmp_path / "m", raw, model="smollm2-135m")
    with pytest.raises(DictionaryMismatchError) as err:
        api.run("dashboards", store=str(raw.root), dictionary=smol)
    assert str(err.value) == (
        f"dictionary {smol} was trained on model 'smollm2-135m', but store {raw.root} is of model "
        f"'{raw.config['model']}'"
    )


def test_patching_refuses_a_narrower_dictionary_before_patching(stores, tmp_path, tiny_model, monkeypatch):
    import workbench.analyses.patching as patching

    POOL.put(tiny_model)
    monkeypatch.setattr(patching, "run_task", lambda *a, **k: pytest.fail("patching computed"))
    narrow = _dictionary(tmp_path, stores["raw"], d_in=32)
    with pytest.raises(DictionaryMismatchError) as err:
        api.run("patching", model=tiny_model.workbench.key, dictionary=narrow, n_prompts=2, methods="atp")
    assert str(err.value) == (
        f"dictionary {narrow} reads {SITE} with width 32, but model '{tiny_model.workbench.key}' has "
        "width 64 there; it was trained on another model or site"
    )


def test_prompt_lens_refuses_a_compat_dictionary_on_a_raw_model(stores, tmp_path, tiny_model, monkeypatch):
    from workbench import lens

    monkeypatch.setattr(lens, "_forward", lambda *a, **k: pytest.fail("the lens ran the model"))
    path = _dictionary(tmp_path, stores["compat"])
    with pytest.raises(lens.LensError) as err:
        lens.prompt_lens(tiny_model, "The cat sat", layer=0, dictionary=path)
    assert str(err.value) == (
        f"dictionary {path} was trained on 'compat' activations (weight processing), but model "
        f"'{tiny_model.workbench.key}' (raw) holds 'raw' ones; load the model with processing compat"
    )


def test_train_sae_writes_the_identity_and_its_sae_is_refused_on_a_compat_store(stores, tmp_path, tiny_model):
    """The real training path: cfg.json records model/processing/store (relative), and sae-eval
    refuses the raw-trained dictionary on the compat store of the same model."""
    POOL.put(tiny_model)
    raw, compat = stores["raw"], stores["compat"]
    trained = api.run(
        "train-sae", store=str(raw.root), site=SITE, arch="topk", d_sae=32, k=4, steps=3, batch_size=32
    )
    cfg = json.loads((Path(trained.dictionary) / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["model_name"] == "llama" and meta["model_from_pretrained_kwargs"] == PROCESSING_KWARGS["raw"]
    assert meta["workbench"]["processing"] == "raw" and meta["workbench"]["store"] == raw.root.name
    assert str(raw.root) not in json.dumps(cfg)
    with pytest.raises(DictionaryMismatchError, match=r"trained on 'raw' activations .* holds 'compat' ones"):
        api.run("sae-eval", store=str(compat.root), dictionary=trained.dictionary)
