"""sae-eval: metric functions on planted data, golden parity with `sae_lens.evals`, planted dictionaries."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import plant_identity

from workbench.sae import metrics as M

SITE = "blocks.0.hook_resid_post"
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
CTX = 32


# --- pure metrics ---------------------------------------------------------------------------
def test_fvu_and_explained_variance_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 4.0], [4.0, 0.0]])
    # mean = (3, 2); Σ‖x−mean‖² = (4+0)+(0+4)+(4+4) = 16; Σ‖x−x̂‖² = 1 + 0 + 1 = 2
    assert M.fvu(x, x_hat) == pytest.approx(2 / 16)
    acc = M.ReconstructionStats(2)
    acc.add(x[:2], x_hat[:2])
    acc.add(x[2:], x_hat[2:])  # streaming over batches = one batch
    assert acc.fvu() == pytest.approx(2 / 16) and acc.explained_variance() == pytest.approx(14 / 16)
    assert acc.mse() == pytest.approx(2 / 3)
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)  # predicting the mean explains nothing


def test_l0_frequency_and_dead_dense():
    f = torch.zeros(100, 4)
    f[:, 0] = 1.0  # fires always
    f[:5, 1] = 2.0  # 5 %
    f[0, 2] = -1.0  # 1 %, signed activations count
    assert M.l0(f)[0] == 3 and M.l0(f)[50] == 1
    acc = M.ReconstructionStats(4, 4)
    acc.add(f, f, f)
    assert acc.frequency().tolist() == pytest.approx([1.0, 0.05, 0.01, 0.0])
    s = M.frequency_summary(acc.frequency())
    assert s == pytest.approx(
        {
            "frac_never_fired": 0.25,
            "frac_alive": 0.75,
            "freq_over_1_percent": 0.5,
            "freq_over_10_percent": 0.25,
        }
    )
    counts, edges, dead = M.log_frequency_histogram(acc.frequency(), bins=8)
    assert dead == 1 and sum(counts) == 3 and len(edges) == 9


def test_ce_score_and_kl():
    assert M.ce_loss_score(2.0, 2.5, 4.0) == pytest.approx(0.75)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    kl = M.kl_per_token(p.log()[None], q.log()[None])
    assert kl.item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert M.kl_per_token(p.log()[None], p.log()[None]).item() == pytest.approx(0.0, abs=1e-7)


def test_decoder_cosines_find_planted_duplicate():
    torch.manual_seed(0)
    W = torch.linalg.qr(torch.randn(16, 16))[0][:6]  # 6 orthonormal rows
    W = torch.cat([W, -2.0 * W[2:3], 0.5 * W[4:5]])  # latent 6 = −2 × latent 2, latent 7 = ½ × latent 4
    cos = M.max_abs_cosine(W)
    assert cos[2] == pytest.approx(1.0, abs=1e-5) and cos[6] == pytest.approx(1.0, abs=1e-5)
    assert cos[0] == pytest.approx(0.0, abs=1e-5)
    idx, vals = M.nearest_by_cosine(W, k=7)
    assert idx.shape == (8, 7) and 6 not in idx[6].tolist()  # never one's own neighbour
    assert idx[4, 0] == 7 and vals[4, 0] == pytest.approx(1.0, abs=1e-5)  # nearest first
    assert idx[2, -1] == 6 and vals[2, -1] == pytest.approx(-1.0, abs=1e-5)  # most negative last


def test_afa_ratio_is_one_for_orthonormal_atoms():
    torch.manual_seed(0)
    W_dec = torch.linalg.qr(torch.randn(32, 32))[0][:8] * 3.0  # orthogonal, norm 3
    f = torch.relu(torch.randn(50, 8))
    z = f @ W_dec  # exact, orthogonal: ‖z‖ = ‖f̃‖ with f̃ = 3f
    norms = M.afa_norms(f, z, W_dec)
    ok = z.norm(dim=-1) > 0
    assert torch.allclose(norms["ratio"][ok], torch.ones(int(ok.sum())), atol=1e-5)
    assert norms["eps_lbo"][ok].max() < 1e-5
    assert M.afa_within_bound(norms, 0.0)[ok].all()
    half = M.afa_norms(f * 0.5, z, W_dec)  # under-activated by 2 → ratio 0.5
    assert torch.allclose(half["ratio"][ok], torch.full((int(ok.sum()),), 0.5), atol=1e-5)
    Q = torch.linalg.qr(torch.randn(32, 32))[0]
    W_dec, b = Q[:8] * 3.0, Q[8] * 4.0  # b_dec orthogonal to every atom, ‖b_dec‖ = 4
    z = f @ W_dec + b
    with_b = M.afa_norms(f, z, W_dec, b)  # ‖b_dec‖ appended as one more coefficient
    assert torch.allclose(with_b["f_norm"] ** 2, (3 * f).pow(2).sum(-1) + 16.0, rtol=1e-4)
    assert torch.allclose(with_b["ratio"], torch.ones(50), atol=1e-5)
    assert torch.allclose(with_b["ratio_centered"][ok], torch.ones(int(ok.sum())), atol=1e-5)


# --- analysis on a tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tiny_model, wikitext, tmp_path_factory):
    from workbench.capture import CaptureConfig, capture
    from workbench.context import POOL

    POOL.put(tiny_model)  # the analyses' ctx.model() finds it instead of booting it again

    cfg = CaptureConfig(
        model=tiny_model.workbench.key,
        sites=(SITE, TC_IN, TC_OUT),
        data=wikitext,
        n_tokens=16 * CTX,
        ctx_len=CTX,
    )
    return capture(cfg, model=tiny_model, out=tmp_path_factory.mktemp("store"), progress=False)


def _save(sae, path) -> str:
    sae.save_model(path)
    return str(path)


def _identity_sae(d: int):
    """ReLU(x) − ReLU(−x) = x: a planted perfect dictionary with d_sae = 2d."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    return plant_identity(
        StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, metadata=SAEMetadata(hook_name=SITE)))
    )


def _topk_sae(d: int, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=4 * d, k=8, metadata=SAEMetadata(hook_name=SITE)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) / sae.W_dec.shape[1] ** 0.5)
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def test_planted_identity_dictionary_is_perfect(store, tmp_path):
    from workbench import api

    d = store.shape(SITE)[0]
    path = _save(_identity_sae(d), tmp_path / "identity")
    row = api.run("sae-eval", dictionary=path, store=str(store.root), n_seqs=4).table[0]
    assert row["fvu"] == pytest.approx(0.0, abs=1e-9) and row["explained_variance"] == pytest.approx(1.0)
    assert row["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and row["kl_div_with_sae"] < 1e-6
    assert row["l0"] == pytest.approx(d, abs=0.01)  # one of each ± pair per dimension
    assert row["frac_never_fired"] == 0.0 and row["mean_max_abs_cos"] == pytest.approx(
        1.0
    )  # ± pairs are anti-parallel
    eos = 50256  # GPT-2's BOS = EOS: the sequence start and the separators between documents
    assert (
        row["n_tokens"] == int((store.token_ids() != eos).sum()) < 16 * (CTX - 1)
    )  # special tokens left out
    assert row["special_excluded"] > 0 and row["split"] == "held_out"


@pytest.mark.parametrize("exclude", [False, True])
def test_golden_parity_with_sae_lens_evals(store, tiny_model, tmp_path, exclude):
    """Our numbers vs `sae_lens.evals.run_evals` on the same SAE and the same token batches.

    Same formulas: SAELens' `explained_variance` (ExplainedVarianceCalculator) is the conventional
    1 − FVU; `mse` is Σ_dims mean_tokens; `ce_loss_score` is a ratio of means. SAELens reads x by
    re-running the model (`run_with_cache`), we read it from the store (same numbers: store parity).
    exclude_special_tokens ↔ skip_special (outlier rule off): both leave BOS and the EOS separators
    between documents (special ids) out of every metric and keep their own activation in the splice.
    """
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    from workbench import api

    sae = _topk_sae(store.shape(SITE)[0])
    path = _save(sae, tmp_path / "topk")
    tokens = store.token_ids().reshape(-1, CTX)

    class Batches:  # the part of an ActivationsStore that run_evals touches
        context_size, store_batch_size_prompts = CTX, 4

        def __init__(self):
            self.i = 0

        def get_batch_tokens(self, n):
            self.i += n
            return tokens[self.i - n : self.i]

        def reset_input_dataset(self):
            self.i = 0

    config = EvalConfig(
        batch_size_prompts=4, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2,
        compute_kl=True, compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True, compute_l2_norms=True,
    )  # fmt: skip
    theirs, feats = run_evals(
        sae, Batches(), tiny_model, ActivationScaler(), config, exclude_special_tokens=exclude
    )
    special = tokens[:8] == tiny_model.tokenizer.eos_token_id  # BOS = EOS id in this tokenizer
    assert not exclude or (special[:, 1:].sum() > 0 and special[:, 0].all())  # separators inside sequences
    n_tokens = int((~special).sum()) if exclude else 8 * CTX
    res = api.run(
        "sae-eval",
        dictionary=path,
        store=str(store.root),
        n_tokens=n_tokens,
        n_seqs=8,
        skip_special=exclude,
        outlier_factor=0,
    )
    ours = res.table[0]
    pairs = {
        "l0": theirs["sparsity"]["l0"],
        "l1": theirs["sparsity"]["l1"],
        "explained_variance": theirs["reconstruction_quality"]["explained_variance"],
        "mse": theirs["reconstruction_quality"]["mse"],
        "cossim": theirs["reconstruction_quality"]["cossim"],
        "ce_loss_score": theirs["model_performance_preservation"]["ce_loss_score"],
        "ce_loss_with_sae": theirs["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_loss_without_sae": theirs["model_performance_preservation"]["ce_loss_without_sae"],
        "ce_loss_with_ablation": theirs["model_performance_preservation"]["ce_loss_with_ablation"],
        "kl_div_with_sae": theirs["model_behavior_preservation"]["kl_div_with_sae"],
        "kl_div_score": theirs["model_behavior_preservation"]["kl_div_score"],
    }
    for name, value in pairs.items():
        scale = max(1.0, abs(value))
        assert ours[name] == pytest.approx(value, abs=1e-4 * scale), name
    assert ours["fvu"] == pytest.approx(1 - pairs["explained_variance"], abs=1e-4)
    assert torch.allclose(res.frequency["0"], torch.tensor(feats["feature_density"]), atol=1e-6)
    assert 0 < ours["l0"] <= 8 and not math.isnan(ours["afa_ratio_mean"])
    assert ours["n_tokens"] == n_tokens and ours["split"] == "held_out"  # a store it never trained on
    assert ours["special_excluded"] == (int(special[:, 1:].sum()) if exclude else 0)


def test_transcoder_zero_decoder_matches_ablation(store, tmp_path):
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    from workbench import api

    d = store.shape(TC_IN)[0]
    meta = SAEMetadata(hook_name=TC_IN, hook_name_out=TC_OUT)
    tc = Transcoder(TranscoderConfig(d_in=d, d_sae=64, d_out=d, apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        tc.W_dec.zero_()  # outputs b_dec = 0: the replacement *is* zero-ablation
    path = _save(tc, tmp_path / "tc")
    res = api.run("sae-eval", dictionary=path, store=str(store.root), n_seqs=4, skip_special=False)
    row = res.table[0]
    assert row["kind"] == "transcoder" and row["site_out"] == TC_OUT
    assert row["replacement_loss"] == pytest.approx(row["ce_loss_with_ablation"], abs=1e-5)
    assert row["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    y = torch.cat([store.read(TC_OUT)]).double()
    assert row["mlp_out_fvu"] == pytest.approx(float(y.pow(2).sum() / (y - y.mean(0)).pow(2).sum()), rel=1e-5)
    assert set(res.figures()) >= {"firing frequency", "AFA norm ratio by layer", "ZF plot", "decoder cosine"}


def test_cache_round_trip_and_clear_errors(store, tmp_path):
    from workbench import api

    path = _save(_topk_sae(store.shape(SITE)[0], seed=1), tmp_path / "topk")
    first = api.run("sae-eval", dictionary=path, store=str(store.root), n_seqs=0)
    again = api.run("sae-eval", dictionary=path, store=str(store.root), n_seqs=0)
    assert again.table == first.table and torch.equal(again.afa_ratio["0"], first.afa_ratio["0"])
    assert "ce_loss_score" not in first.table[0]
    with pytest.raises(ValueError, match="needs --dictionary"):
        api.run("sae-eval", store=str(store.root))
    with pytest.raises(Exception, match="no dictionary|neither a dictionary folder"):
        api.run("sae-eval", dictionary=str(tmp_path / "nope"), store=str(store.root))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "mp", "top_afa"])
def test_every_architecture_evaluates_like_a_direct_forward(arch, store, tmp_path):
    """Our dictionaries (sae.archs, saved by sae.io) through sae-eval = a direct encode/decode."""
    archs = pytest.importorskip("workbench.sae.archs")
    io = pytest.importorskip("workbench.sae.io")
    from workbench import api

    d = store.shape(SITE)[0]
    sae = archs.build(archs.ArchSpec(arch, d_in=d, d_sae=64, k=4), metadata={"hook_name": SITE})
    path = io.save_dictionary(sae, tmp_path / arch)
    res = api.run("sae-eval", dictionary=f"{path},{path}", store=str(store.root), n_seqs=0, outlier_factor=0)
    assert len(res.table) == 2 and res.table[0]["fvu"] == res.table[1]["fvu"]  # one row per dictionary
    loaded = io.load_dictionary(path)
    x = store.read(SITE).double()
    x = x[store.token_ids() != 50256]  # BOS and the document separators (GPT-2's EOS) left out
    with torch.no_grad():
        f = loaded.encode(x.float())
        x_hat = loaded.decode(f).double()
    row = res.table[0]
    assert row["l0"] == pytest.approx(float((f != 0).sum(-1).double().mean()), rel=1e-6)
    ref = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert row["fvu"] == pytest.approx(ref, rel=1e-4)
    assert res.l0_per_token["0"].shape == (len(x),)
