"""Evaluation metrics of sparse dictionaries: pure tensor functions, no model and no I/O.

Definitions (methods.md §2.0, ecosystem.md §4.4; field names follow SAELens/SAEBench):
- L0 = mean over tokens of #{i : f_i != 0}.
- FVU = Σ_tokens ‖x − x̂‖² / Σ_tokens ‖x − mean(x)‖², mean taken per dimension over all evaluated
  tokens (the conventional definition, SAELens PR #443/#665); explained variance = 1 − FVU.
  The *legacy* SAELens value (mean over tokens of 1 − ‖x − x̂‖² / ‖x − mean_batch(x)‖²) is kept only
  for comparison: it depends on the batch size.
- CE loss recovered = (CE_zero_ablate − CE_spliced) / (CE_zero_ablate − CE_clean); KL = KL(clean ‖ spliced)
  of the next-token distributions, averaged over tokens.
- Never-fired latents (`frac_never_fired`, SAEBench's frac_dead) fire on no evaluated token; dense latents
  fire on more than 1 % / 10 % of tokens. Dead *by the training window* (AuxK's target) is another
  measure: `frac_dead_window` in train-sae.
- AFA (Lee et al. 2025, arXiv 2503.24277 §3): for ε-quasi-orthogonal unit atoms ‖f‖₂ ≈ ‖z‖₂, with
  |‖z‖² − ‖f‖²| ≤ ε(‖f‖₁² − ‖f‖₂²). f̃_i = f_i‖W_dec,i‖ with ‖b_dec‖ appended as one extra
  coefficient (their `zf-plot.ipynb`); εLBO = |‖z‖² − ‖f̃‖²| / ((h − 1)‖f̃‖²).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

FVU_FORMULA = (
    "FVU = sum_tokens ||x - x_hat||^2 / sum_tokens ||x - mean_tokens(x)||^2; explained_variance = 1 - FVU"
)
CE_FORMULA = "ce_loss_score = (CE_zero_ablate - CE_spliced) / (CE_zero_ablate - CE_clean)"


def l0(f: Float[Tensor, "batch d_sae"]) -> Float[Tensor, " batch"]:
    """Number of active latents per token (!= 0, so signed architectures count too)."""
    return (f != 0).sum(-1).float()


def fvu(x: Float[Tensor, "batch d"], x_hat: Float[Tensor, "batch d"]) -> float:
    """Fraction of variance unexplained, conventional definition (sums over tokens and dimensions)."""
    acc = ReconstructionStats(x.shape[-1])
    acc.add(x, x_hat)
    return acc.fvu()


def explained_variance_legacy(x: Float[Tensor, "batch d"], x_hat: Float[Tensor, "batch d"]) -> float:
    """SAELens' pre-#443 per-token formula (batch-size dependent); reported only for comparison."""
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    return float((1 - resid / var).mean())


class ReconstructionStats:
    """Streaming float64 sums for FVU, MSE, cosine, L0/L1 and per-latent firing counts."""

    def __init__(self, d: int, d_sae: int | None = None):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sum_resid = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fires = torch.zeros(d_sae or 0, dtype=torch.float64)

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor | None = None) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += len(x)
        self.sum_x += x.sum(0)
        self.sum_sq += float(x.pow(2).sum())
        self.sum_resid += float((x - x_hat).pow(2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        if f is not None:
            self.sum_l0 += float(l0(f).sum())
            self.sum_l1 += float(f.double().abs().sum())
            self.fires += (f != 0).sum(0).double()

    def total_variance(self) -> float:
        """Σ_tokens ‖x − mean(x)‖² = Σ‖x‖² − n‖mean(x)‖² (float64 against cancellation)."""
        return self.sum_sq - float(self.sum_x.pow(2).sum()) / max(self.n, 1)

    def fvu(self) -> float:
        var = self.total_variance()
        if var < 1e-12:
            return 0.0 if self.sum_resid < 1e-12 else math.inf
        return self.sum_resid / var

    def explained_variance(self) -> float:
        return 1.0 - self.fvu()

    def mse(self) -> float:
        """Mean over tokens of ‖x − x̂‖² (SAELens' `mse`: sum over dims, mean over tokens)."""
        return self.sum_resid / max(self.n, 1)

    def cossim(self) -> float:
        return self.sum_cos / max(self.n, 1)

    def l0(self) -> float:
        return self.sum_l0 / max(self.n, 1)

    def l1(self) -> float:
        return self.sum_l1 / max(self.n, 1)

    def frequency(self) -> Tensor:
        """Firing frequency per latent over the evaluated tokens, [d_sae]."""
        return (self.fires / max(self.n, 1)).float()


def ce_loss_score(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """CE loss recovered; 1 = as good as the clean model, 0 = as bad as zero-ablation."""
    denom = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / denom if denom != 0 else math.nan


def kl_per_token(
    clean_logits: Float[Tensor, "... vocab"], new_logits: Float[Tensor, "... vocab"]
) -> Float[Tensor, "..."]:
    """KL(clean ‖ new) of the next-token distributions, per position."""
    log_p = torch.log_softmax(clean_logits.float(), -1)
    log_q = torch.log_softmax(new_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def frequency_summary(freq: Float[Tensor, " d_sae"]) -> dict[str, float]:
    """Never-fired/alive/dense fractions of latents from their firing frequencies (SAEBench names, except
    `frac_never_fired` = SAEBench's frac_dead, renamed apart from the training window's dead latents)."""
    return {
        "frac_never_fired": float((freq == 0).float().mean()),
        "frac_alive": float((freq > 0).float().mean()),
        "freq_over_1_percent": float((freq > 0.01).float().mean()),
        "freq_over_10_percent": float((freq > 0.1).float().mean()),
    }


def log_frequency_histogram(
    freq: Float[Tensor, " d_sae"], bins: int = 40, lo: float = -8.0
) -> tuple[list[int], list[float], int]:
    """Histogram of log10 firing frequency of live latents; returns (counts, edges, n_dead)."""
    live = freq[freq > 0].double().log10().clamp(min=lo)
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(live, bins=bins, min=lo, max=0.0) if len(live) else torch.zeros(bins)
    return [int(c) for c in counts], edges.tolist(), int((freq == 0).sum())


def _unit_rows(W: Tensor) -> Tensor:
    W = W.detach().float()
    return W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def nearest_by_cosine(W: Float[Tensor, "n d"], k: int = 8, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each row, the k other rows of highest cosine similarity: (indices [n, k], cos [n, k])."""
    U = _unit_rows(W)
    k = min(k, len(U) - 1)
    idx, vals = [], []
    for lo in range(0, len(U), chunk):
        cos = U[lo : lo + chunk] @ U.T  # [chunk, n]
        rows = torch.arange(lo, min(lo + chunk, len(U)))
        cos[torch.arange(len(rows)), rows] = -math.inf  # never one's own neighbour
        v, i = cos.topk(k, dim=-1)
        idx.append(i)
        vals.append(v.float())
    return torch.cat(idx), torch.cat(vals)


def max_abs_cosine(W_dec: Float[Tensor, "d_sae d"], chunk: int = 1024) -> Float[Tensor, " d_sae"]:
    """Per latent, max |cos| of its decoder row to any other latent's (1 = a duplicate)."""
    U = _unit_rows(W_dec)
    out = []
    for lo in range(0, len(U), chunk):
        cos = (U[lo : lo + chunk] @ U.T).abs()
        rows = torch.arange(lo, min(lo + chunk, len(U)))
        cos[torch.arange(len(rows)), rows] = 0.0
        out.append(cos.max(-1).values.float())
    return torch.cat(out)


def afa_norms(
    f: Float[Tensor, "batch d_sae"],
    z: Float[Tensor, "batch d"],
    W_dec: Float[Tensor, "d_sae d"],
    b_dec: Float[Tensor, " d"] | None = None,
) -> dict[str, Tensor]:
    """Per-token AFA quantities (Lee et al. 2025): ‖f̃‖₂, ‖f̃‖₁, ‖z‖₂, ratio ‖f̃‖/‖z‖ and εLBO.

    f̃_i = f_i‖W_dec,i‖; when b_dec is given, ‖b_dec‖ is appended as an extra coefficient
    (b_dec/‖b_dec‖ is treated as one more atom), as in the paper's ZF plot, and
    `ratio_centered` = ‖f̃ without b_dec‖ / ‖z − b_dec‖ is the quantity top-AFA's k* selection
    matches (its expectation is also 1).
    """
    f_tilde = f.double() * W_dec.double().norm(dim=-1)  # [batch, d_sae]
    sq = f_tilde.pow(2).sum(-1)
    l1 = f_tilde.abs().sum(-1)
    h = f.shape[-1]
    out = {}
    if b_dec is not None:
        centered = (z.double() - b_dec.double()).norm(dim=-1)
        out["ratio_centered"] = (sq.sqrt() / centered.clamp(min=1e-12)).float()
        b = float(b_dec.double().norm())
        sq, l1, h = sq + b * b, l1 + b, h + 1
    z_sq = z.double().pow(2).sum(-1)
    f_norm = sq.sqrt()
    return out | {
        "f_norm": f_norm.float(),
        "f_l1": l1.float(),
        "z_norm": z_sq.sqrt().float(),
        "ratio": (f_norm / z_sq.sqrt().clamp(min=1e-12)).float(),
        "eps_lbo": ((z_sq - sq).abs() / ((h - 1) * sq.clamp(min=1e-12))).float(),
    }


def afa_within_bound(norms: dict[str, Tensor], eps: float) -> Tensor:
    """Whether each token satisfies the AFA bound |‖z‖² − ‖f̃‖²| ≤ ε(‖f̃‖₁² − ‖f̃‖₂²) for a given ε."""
    z_sq, f_sq, l1 = norms["z_norm"].double() ** 2, norms["f_norm"].double() ** 2, norms["f_l1"].double()
    return (z_sq - f_sq).abs() <= eps * (l1.pow(2) - f_sq) + 1e-5 * z_sq  # float32 norms
