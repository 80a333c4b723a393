"""Shared fixtures: tiny random HF models (GPT-2, Llama, GPT-NeoX shapes) booted through the Bridge,
an isolated WORKBENCH_HOME per test, real text from ../shared, and the real smollm2-135m (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # CI clones the project with shared/ beside it
    SHARED = Path(os.environ.get("WORKBENCH_SHARED", "/work/shared"))
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-test" / "wiki.test.raw"
TINYSTORIES = SHARED / "data" / "tinystories-sample" / "tinystories_1000.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _tiny_config(arch: str, vocab: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, activation_function="gelu_new"
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    raise ValueError(arch)


def make_tiny_model_dir(root: Path, arch: str, seed: int = 0) -> Path:
    """Save a tiny random HF causal LM with the real GPT-2 tokenizer into root/arch; returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / arch
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session", params=["gpt2", "llama", "neox"])
def tiny_model_dir_any(request, tiny_models_root) -> Path:
    """Each tiny architecture in turn."""
    return make_tiny_model_dir(tiny_models_root, request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models_root) -> Path:
    """The default tiny model: Llama-shaped (gated SiLU MLP, like SmolLM2)."""
    return make_tiny_model_dir(tiny_models_root, "llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from workbench.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session", autouse=True)
def _no_store_leaks_into_the_real_home(tmp_path_factory):
    """A store of one of this session's models in the real home is a test writing outside its own
    WORKBENCH_HOME (a `monkeypatch.undo()` once unset the variable mid-test): fail the session."""
    real = Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench")) / "stores"
    before = set(real.glob("*"))
    yield
    ours = str(tmp_path_factory.getbasetemp())
    leaked = [p for p in set(real.glob("*")) - before if ours in _text(p / "run.json")]
    assert not leaked, f"tests wrote stores into {real}: {sorted(p.name for p in leaked)}"


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.fixture(autouse=True)
def workbench_home(tmp_path, monkeypatch) -> Path:
    """Each test gets its own stores and results cache; converted real models stay shared."""
    home = tmp_path / "wbhome"
    home.mkdir()
    models = Path(os.environ.get("WORKBENCH_TEST_MODELS", Path.home() / ".cache" / "workbench" / "models"))
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def wikitext() -> str:
    return str(WIKITEXT)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once into ~/.cache/workbench/models, then reused)."""
    from workbench.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def tiny_store(tiny_model, tiny_model_dir, wikitext):
    """Capture(sites, n_tokens) -> a store of the tiny model over WikiText, the model pooled so
    analyses find it instead of booting it again."""
    import workbench as wb
    from workbench.context import POOL

    def make(sites: tuple[str, ...], n_tokens: int):
        POOL.put(tiny_model)
        return wb.capture(
            model=str(tiny_model_dir),
            data=wikitext,
            n_tokens=n_tokens,
            ctx_len=32,
            progress=False,
            sites=sites,
        )

    return make


def plant_identity(sae):
    """W_enc = [I, -I], W_dec = [I; -I], zero biases: ReLU(x) - ReLU(-x) = x, a planted perfect
    dictionary with d_sae = 2 d_in. Returns the SAE."""
    eye = torch.eye(sae.W_enc.shape[0])
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
