"""Loss and encoder details checked against the papers' code (issue 13 item 10).

* top-AFA (Lee et al. 2025, `top-afa-sae/training/sae.py::TopAFASAE.get_loss_dict`): the paper's
  loss is mean_{tokens,d}(x̂ − x)² + λ_AFA · mean_tokens(‖f‖ − ‖x‖)²; SAELens' MSE sums over d_in,
  so our AFA term is scaled by d_in and `afa_coefficient` keeps the paper's meaning. Its target
  norm ‖x − b_dec‖ is detached: the term never pulls on b_dec directly.
* MP-SAE (Costa et al. 2025) runs exactly k greedy steps; SAELens' default stops a token as soon
  as a step re-selects an atom already in its support, so later new atoms are never added.
"""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit
from sae_lens.saes.sae import TrainStepInput

from workbench.sae.archs import ArchSpec, build
from workbench.sae.io import load_dictionary, save_dictionary

D_IN, D_SAE = 16, 48


def _top_afa(coefficient: float, b_dec: float, seed: int = 0):
    sae = build(ArchSpec("top_afa", D_IN, D_SAE, afa_coefficient=coefficient), {}, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(b_dec * torch.randn(D_IN, generator=torch.Generator().manual_seed(seed)))
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed + 1)) * 3
    return sae, x


def _losses(sae, x: torch.Tensor, coefficient: float) -> dict[str, torch.Tensor]:
    step = TrainStepInput(
        x, {"afa": coefficient}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )
    return sae.training_forward_pass(step).losses


@pytest.mark.parametrize("coefficient", [1 / 128, 1 / 32, 1 / 16])
def test_top_afa_coefficient_means_the_papers(coefficient):
    """Ours / d_in == the paper's formula term by term (b_dec = 0, where ‖x − b_dec‖ = ‖x‖)."""
    sae, x = _top_afa(coefficient, b_dec=0.0)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # unit atoms: ‖f‖ unscaled = scaled
    losses = _losses(sae, x, coefficient)
    with torch.no_grad():
        f = sae.encode_with_hidden_pre(x)[0]
        x_hat = sae.decode(f)
        paper_mse = (x_hat - x).pow(2).mean()
        paper_afa = coefficient * (f.norm(dim=-1) - x.norm(dim=-1)).pow(2).mean()
    assert losses["mse_loss"].item() / D_IN == pytest.approx(paper_mse.item(), rel=1e-5)
    assert losses["afa_loss"].item() / D_IN == pytest.approx(paper_afa.item(), rel=1e-5)


def test_top_afa_target_norm_does_not_pull_on_b_dec():
    """∂(AFA term)/∂b_dec equals the gradient with ‖x − b_dec‖ replaced by a constant (only the
    path through the codes f remains); the undetached form's gradient is measurably different."""
    sae, x = _top_afa(1 / 32, b_dec=1.0)
    afa = _losses(sae, x, 1 / 32)["afa_loss"]
    (ours,) = torch.autograd.grad(afa, sae.b_dec)

    target = (x - sae.b_dec).norm(dim=-1).detach().clone()  # a plain constant tensor

    def afa_with(target_norm: torch.Tensor) -> torch.Tensor:
        f = sae.encode_with_hidden_pre(x)[0]
        return (1 / 32) * D_IN * (f.norm(dim=-1) - target_norm).pow(2).mean()

    (constant,) = torch.autograd.grad(afa_with(target), sae.b_dec)
    (pulling,) = torch.autograd.grad(afa_with((x - sae.b_dec).norm(dim=-1)), sae.b_dec)
    assert torch.allclose(ours, constant, atol=1e-6)
    assert (pulling - constant).norm() > 0.1 * constant.norm()


def reference_mp(x: torch.Tensor, W_dec: torch.Tensor, k: int) -> torch.Tensor:
    """Plain matching pursuit, exactly k steps: pick argmax_j ReLU(⟨r, d_j⟩), add it, subtract."""
    r, acts = x.clone(), torch.zeros(len(x), len(W_dec))
    for _ in range(k):
        c = (r @ W_dec.T).relu()
        i = c.argmax(-1, keepdim=True)
        v = c.gather(-1, i)
        acts.scatter_add_(-1, i, v)
        r = r - v * W_dec[i[:, 0]]
    return acts


def _mp(W_dec: torch.Tensor, k: int, tmp_path):
    """Our MP-SAE with decoder W_dec, b_dec 0, through save -> load (the inference class)."""
    sae = build(ArchSpec("mp", W_dec.shape[1], len(W_dec), k=k), {}, seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.b_dec.zero_()
    return sae, load_dictionary(save_dictionary(sae, tmp_path / "mp"))


def test_mp_runs_exactly_k_steps_where_saelens_would_stop(tmp_path):
    """Atoms a = e1, b = (cos 120°, sin 120°, 0), c = e3; x = (1, 1, 0.24). Steps: a (1), b (0.866),
    a again (0.433: the residual is not orthogonal to a), then c (0.24). SAELens' default stops at
    the re-selection of a and never adds c."""
    t = math.radians(120)
    W = torch.tensor([[1.0, 0, 0], [math.cos(t), math.sin(t), 0], [0, 0, 1.0]])
    x = torch.tensor([[1.0, 1.0, 0.24]])
    train_sae, sae = _mp(W, k=4, tmp_path=tmp_path)
    expected = torch.tensor([[1 - math.cos(t) * math.sin(t), math.sin(t), 0.24]])  # a: 1 + 0.433
    for model in (sae, train_sae):
        acts = model.encode(x).detach()
        assert torch.allclose(acts, expected, atol=1e-5), acts
        assert (acts != 0).sum().item() == 3
    early = _encode_matching_pursuit(x, W, 0.0, 4, stop_on_duplicate_support=True)
    assert (early != 0).sum().item() == 2  # the behaviour we do not want


def test_mp_matches_exact_k_reference_on_random_data(tmp_path):
    """A random overcomplete unit-norm dictionary: every row equals the k-step reference, and on
    some rows SAELens' early stop gives a different code (so this test would catch it)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D_SAE, D_IN, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    x = torch.randn(512, D_IN, generator=g)
    k = 8
    train_sae, sae = _mp(W, k, tmp_path)
    ref = reference_mp(x, W, k)
    with torch.no_grad():
        for model in (sae, train_sae):
            assert torch.allclose(model.encode(x), ref, atol=1e-5)
    early = _encode_matching_pursuit(x, W, 0.0, k, stop_on_duplicate_support=True)
    differs = ((early - ref).abs().amax(-1) > 1e-4).float().mean().item()
    print(f"\nMP k={k}: SAELens' early stop changes {differs:.1%} of the codes")
    assert differs > 0.05, differs
