"""Training from the activation store: the shuffled stream, resume with an identical next step,
the `train-sae` analysis end to end, and a transcoder on a tiny model that beats zero-ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench import api
from workbench.sae.archs import ArchSpec, build
from workbench.sae.data import StoreStream
from workbench.sae.io import load_dictionary
from workbench.sae.train import LoopConfig, train

LAYER = 1
SITES = [
    f"blocks.{LAYER}.hook_resid_post",
    f"blocks.{LAYER}.mlp.hook_in",
    f"blocks.{LAYER}.hook_mlp_out",
]
CTX = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama whose MLPs matter: down_proj scaled x40, so replacing or ablating
    blocks.1.mlp visibly moves the logits (at init it barely does)."""
    from conftest import make_tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.models import load_model

    root = tmp_path_factory.mktemp("mlp-heavy")
    src = make_tiny_model_dir(root, "llama", seed=1)
    hf = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight *= 40
    hf.save_pretrained(root / "heavy")
    AutoTokenizer.from_pretrained(src).save_pretrained(root / "heavy")
    return load_model(str(root / "heavy"))


@pytest.fixture(scope="module")
def store(model, wikitext, tmp_path_factory):
    from workbench.capture import CaptureConfig, capture

    cfg = CaptureConfig(
        model=str(model.workbench.key), sites=tuple(SITES), data=wikitext, n_tokens=4096, ctx_len=CTX
    )
    return capture(cfg, model=model, out=tmp_path_factory.mktemp("store") / "run", progress=False)


def test_stream_is_seeded_skips_bos_and_resumes_mid_epoch(store):
    a = StoreStream(store, SITES[:1], 128, seed=3, buffer_batches=4)
    first = [next(a) for _ in range(40)]  # more than one epoch (31 batches per epoch here)
    kept = store.n_rows - store.n_rows // CTX  # BOS rows dropped
    assert a.kept_rows() == kept and 0 < a.batches_per_epoch() <= kept // 128
    again = StoreStream(store, SITES[:1], 128, seed=3, buffer_batches=4)
    assert all(torch.equal(x, next(again)) for x in first)
    for start in (7, 33):  # mid first epoch, and into the second one
        resumed = StoreStream(store, SITES[:1], 128, seed=3, buffer_batches=4, start=start)
        assert torch.equal(next(resumed), first[start])
    other = StoreStream(store, SITES[:1], 128, seed=4, buffer_batches=4)
    assert not torch.equal(next(other), first[0])
    bos_rows = store.read(SITES[0], 0, store.n_rows)[::CTX]  # position-0 rows
    seen = torch.cat(first[: a.batches_per_epoch()])
    assert not (torch.cdist(bos_rows, seen).min(dim=1).values < 1e-6).any(), "a BOS row was streamed"


def test_paired_sites_share_rows(store):
    """Transcoder batches are [ln2, mlp_out] of the same token."""
    x_all, y_all = store.read(SITES[1]), store.read(SITES[2])
    batch = next(StoreStream(store, SITES[1:], 64, seed=0))
    x, y = batch.split([x_all.shape[1], y_all.shape[1]], dim=-1)
    rows = torch.cdist(x, x_all).argmin(dim=1)
    assert torch.allclose(y_all[rows], y)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_resume_gives_identical_next_step(store, arch, tmp_path):
    """N steps, a checkpoint, a fresh process state, 1 more step == N + 1 uninterrupted steps."""
    spec = ArchSpec(arch, 64, 128, k=8)
    loop = LoopConfig(steps=6, batch_size=128, lr=1e-3, checkpoint_every=100, dead_window_steps=2)

    def stream(start: int) -> StoreStream:
        return StoreStream(store, SITES[:1], 128, seed=1, scales=[0.5], start=start)

    full = build(spec, seed=7)
    train(full, stream, loop, tmp_path / "full", {"run": 1}, show_bar=False)
    part = build(spec, seed=7)
    assert train(part, stream, loop, tmp_path / "part", {"run": 1}, show_bar=False, stop_after=5) is None
    resumed = build(spec, seed=99)  # different init: everything must come from the checkpoint
    outcome = train(resumed, stream, loop, tmp_path / "part", {"run": 1}, show_bar=False)
    assert outcome.resumed_from == 5 and outcome.steps_done == 6
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{arch}: {name} differs after resume"
    other = LoopConfig(steps=9, batch_size=128)
    train(build(spec), stream, other, tmp_path / "part2", {"run": 1}, show_bar=False, stop_after=1)
    with pytest.raises(RuntimeError, match="different training run"):
        train(build(spec), stream, other, tmp_path / "part2", {"run": 2}, show_bar=False)


def test_train_sae_analysis_end_to_end(store):
    opts = dict(
        store=str(store.root), site=SITES[0], arch="topk", d_sae=256, k=8, batch_size=256, steps=40, lr=3e-3
    )
    res = api.run("train-sae", **opts)
    cfg = json.loads(Path(res.dictionary, "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == SITES[0] and meta["prepend_bos"] is True and meta["context_size"] == CTX
    assert meta["workbench"]["processing"] == "raw" and meta["workbench"]["bos"] == "prepend"
    assert meta["workbench"]["store_fingerprint"] == store.fingerprint
    sae = load_dictionary(res.dictionary)
    assert sae.cfg.d_in == 64 and sae.W_dec.shape == (256, 64)
    assert res.final["l0"] == pytest.approx(8.0) and 0 < res.final["fvu"] < 1
    assert set(res.curves) >= {"loss", "l0", "fvu", "frac_dead_window", "aux_loss", "revived"}
    assert len(res.curves["step"]) == 4
    assert len(res.figures()) == 4
    assert api.run("train-sae", **opts).dictionary == res.dictionary  # a cache hit, same folder
    with pytest.raises(ValueError, match="choose --site"):
        api.run("train-sae", store=str(store.root), arch="topk")
    with pytest.raises(ValueError, match=r"arch must be one of \['standard', 'topk'.*got 'nope'"):
        api.run("train-sae", store=str(store.root), arch="nope")


def _spliced_logits(model, tokens: torch.Tensor, mlp_out_fn) -> torch.Tensor:
    """Logits with blocks.L.hook_mlp_out replaced by mlp_out_fn(ln2 input, clean mlp_out)."""
    saved = {}

    def grab(act, hook):
        saved["x"] = act

    def replace(act, hook):
        return mlp_out_fn(saved["x"], act)

    with torch.no_grad():
        return model.run_with_hooks(
            tokens, fwd_hooks=[(SITES[1], grab), (SITES[2], replace)], return_type="logits"
        )


def test_transcoder_beats_zero_ablation(store, model):
    """Replacement loss = KL(clean ‖ spliced) of the next-token distribution. (Next-token CE of a
    random model sits at ≈ ln(vocab) whatever is spliced, so it is printed, not asserted.)"""
    res = api.run(
        "train-sae",
        store=str(store.root),
        arch="transcoder",
        d_sae=256,
        batch_size=256,
        steps=150,
        lr=3e-3,
        l1_coefficient=0.3,
    )
    assert res.site == SITES[1] and res.target_site == SITES[2]
    tc = load_dictionary(res.dictionary)
    assert type(tc).__name__ == "Transcoder" and tc.cfg.metadata.hook_name_out == SITES[2]
    tokens = store.token_ids().reshape(-1, CTX)[:16]
    runs = {
        "clean": lambda x, y: y,
        "transcoder": lambda x, y: tc(x.float()).to(y.dtype),
        "zero": lambda x, y: torch.zeros_like(y),
    }
    logp = {k: _spliced_logits(model, tokens, fn).log_softmax(-1) for k, fn in runs.items()}
    kl = {k: (logp["clean"].exp() * (logp["clean"] - v)).sum(-1).mean().item() for k, v in logp.items()}
    ce = {k: -v[:, :-1].gather(-1, tokens[:, 1:, None]).mean().item() for k, v in logp.items()}
    print(
        f"\ntranscoder L{LAYER} (L0 {res.final['l0']:.1f}, FVU {res.final['fvu']:.3f}): KL to clean {kl}, CE {ce}"
    )
    assert kl["transcoder"] < 0.5 * kl["zero"]


class _Planted:
    """Endless batches of 256 sparse sums of 128 planted unit directions in R^64 (p 0.04, ×5)."""

    def __init__(self, start: int):
        g = torch.Generator().manual_seed(0)
        self.atoms = torch.nn.functional.normalize(torch.randn(128, 64, generator=g), dim=-1)
        self.gen = torch.Generator().manual_seed(1 + start)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        on = (torch.rand(256, 128, generator=self.gen) < 0.04).float()
        return on * torch.rand(256, 128, generator=self.gen) @ self.atoms * 5


def _auxk_run(tmp_path, aux: float, window: int):
    """A wide TopK SAE (512 latents, k 4) from SAELens' init: hundreds of latents never win a top-k
    contest and are dead by a 10-step window."""
    spec = ArchSpec("topk", 64, 512, k=4, aux_coefficient=aux)
    loop = LoopConfig(steps=300, batch_size=256, lr=3e-3, dead_window_steps=window, checkpoint_every=10**6)
    return train(build(spec, seed=0), _Planted, loop, tmp_path / f"{aux}-{window}", {}, show_bar=False)


def test_auxk_engages_and_revives_dead_latents(tmp_path):
    """AuxK (Gao et al. 2024) trains the top dead latents on the main loss's residual. It engages
    (dead latents exist, aux loss > 0) and dead latents fire again (revived ⊆ ever dead). The
    planted regressions — coefficient 0, or a window longer than the run — give aux loss 0.
    Measured (not asserted): revival is not much higher than without AuxK here (75 vs 96 of ~390
    at α = 1/32; 107 at α = 1), see data/sae_notes.md."""
    on = _auxk_run(tmp_path, 1 / 32, 10)
    print(
        f"\nAuxK: ever dead {int(on.ever_dead.sum())}, revived {int(on.revived.sum())}, "
        f"aux loss max {on.curves['aux_loss'].max():.4f}, final dead {on.curves['frac_dead_window'][-1]:.3f}"
    )
    assert on.ever_dead.sum() > 100 and on.curves["aux_loss"].max() > 0.01
    assert on.revived.sum() > 10 and not (on.revived & ~on.ever_dead).any()
    assert (on.curves["revived"].diff() >= 0).all() and on.curves["revived"][-1] == on.revived.sum()
    for aux, window in ((0.0, 10), (1 / 32, 10**6)):  # AuxK off / never told which latents are dead
        off = _auxk_run(tmp_path, aux, window)
        assert off.curves["aux_loss"].max() == 0


def test_resampling_counts_latents_silent_for_its_own_window(tmp_path):
    """The loop resamples latents silent for `resample_window_steps`, shorter than AuxK's window
    (here never reached: no latent is dead by it); 0 falls back to AuxK's window."""
    spec = ArchSpec("topk", 64, 512, k=4)
    runs = {}
    for window in (3, 0):
        loop = LoopConfig(
            steps=32, batch_size=256, lr=3e-3, dead_window_steps=10**6, checkpoint_every=10**6,
            resample_dead=True, resample_window_steps=window,
        )  # fmt: skip
        runs[window] = train(build(spec, seed=0), _Planted, loop, tmp_path / str(window), {}, show_bar=False)
    assert runs[3].resampled.sum() > 50 and not runs[3].ever_dead.any()
    assert not runs[0].resampled.any()


def test_resampling_gives_dead_latents_error_directions_and_leaves_the_rest(tmp_path):
    """sae.resample: every latent counted dead gets the unit reconstruction error of a batch row as
    decoder row and encoder direction, its Adam moments and dead counter reset; live latents keep
    their weights. (On the planted run above it does not lower the final dead fraction — 0.730 vs
    0.727 — the planted data needs few latents; on smollm2 it does, data/sae_notes.md.)"""
    from workbench.sae import resample
    from workbench.sae.train import make_trainer

    sae = build(ArchSpec("topk", 64, 512, k=4), seed=0)
    trainer = make_trainer(sae, LoopConfig(steps=20, batch_size=256, lr=3e-3, dead_window_steps=3))
    batch = next(iter(_Planted(0)))
    for _ in range(5):
        out = trainer.step(batch)
    dead = trainer.dead_neurons.clone()
    assert 0 < int(dead.sum()) < 512
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    new = resample.resample_dead(trainer, out, torch.Generator().manual_seed(0))
    assert torch.equal(new, dead)
    n = int(new.sum())
    err = out.sae_in - out.sae_out
    units = err / err.norm(dim=-1, keepdim=True)
    cos = sae.W_dec.data[dead] @ units.T  # each new row is one of the batch's error directions
    torch.testing.assert_close(cos.max(-1).values, torch.ones(n), atol=1e-5, rtol=0)
    enc = sae.W_enc.data[:, dead].T
    torch.testing.assert_close(enc / enc.norm(dim=-1, keepdim=True), sae.W_dec.data[dead], atol=1e-5, rtol=0)
    for name in ("W_dec", "b_enc"):
        assert torch.equal(sae.state_dict()[name][~dead], before[name][~dead])
    assert torch.equal(sae.W_enc.data[:, ~dead], before["W_enc"][:, ~dead])
    assert not trainer.dead_neurons.any() and (trainer.n_forward_passes_since_fired[dead] == 0).all()
    for moment in trainer.optimizer.state[sae.W_dec].values():
        if moment.shape == sae.W_dec.shape:
            assert not moment[dead].any() and moment[~dead].any()
    assert [s for s in range(1, 321) if resample.due(s, 320)] == list(range(20, 241, 20))  # 1/16 until 3/4
