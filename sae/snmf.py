"""SNMF: semi-nonnegative matrix factorisation of MLP activations with winner-take-all sparsity.

Shafran, Geiger, Geva 2025, "Decomposing MLP activations into interpretable features via
semi-nonnegative matrix factorization" (arXiv 2506.10920), on top of Ding, Li, Jordan 2010
("Convex and semi-nonnegative matrix factorizations"). Data convention: `fit(A)` takes
A [n_tokens, d_mlp] (rows = tokens, as every store read returns them); internally the paper's
Aᵀ ≈ F Gᵀ with F [d_mlp, rank] of mixed sign (each feature a sparse combination of neurons) and
G [n_tokens, rank] ≥ 0 (each token's coefficients).

One iteration (the paper's `NMFSemiNMF.fit`):
  1. F ← Aᵀ G (GᵀG + 1e-6·I)⁻¹                                  (closed form, ridge 1e-6)
  2. per column of F keep the ⌈p·d_mlp⌉ largest |F|, zero the rest (winner-take-all; p = `sparsity`)
  3. divide each column of G by its ℓ₂ norm and multiply F's column by it (same product)
  4. G ← G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + 1e-6)), P = A F, Q = FᵀF, X⁺/X⁻ = positive/negative
     parts (Ding–Li–Jordan multiplicative update)
  5. loss ‖A − G Fᵀ‖²_F = ‖A‖² − 2 tr(Fᵀ AᵀG) + tr(FᵀF GᵀG), from the traces (A − GFᵀ is never formed)
Only two [n, d]-sized products per iteration: P = A F and AᵀG (shared by the loss and the next F step).

Deviations from the reference code, each for a stated reason:
  * the returned factors are the best iterate seen (any decrease counts), while the patience counter
    only resets on an improvement larger than `tol` (the paper's code conflates both, so its returned
    loss could exceed the minimum seen by up to `tol`);
  * the WTA keeps exactly ⌈p·d_mlp⌉ entries (topk indices; a threshold `>=` keeps ties too);
  * `refit_coef=True` (default): after the loop, `coef_` is re-solved for the best F by `transform`'s
    own solver (see `solve_coef`), so `transform(A_train)` reproduces `coef_`. The best iterate's G is
    one multiplicative step from the previous one, not the optimum for its F; the re-solve usually
    lowers the loss (`loss_` ≤ `best_loss_` on planted data; both are recorded).
`sparsity=None` or 1.0 turns step 2 off: plain semi-NMF (Ding et al. 2010), whose loss does not increase.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

RIDGE = 1e-6  # the paper's regulariser of GᵀG in the F step
EPS = 1e-6  # the paper's denominator epsilon in the G update, and the positive floor of G inits
INITS = ("random", "svd", "kmeans")
KMEANS_ITERS = 15  # the paper's k-means init (Ding et al. 2010) runs 15 Lloyd iterations

Progress = Callable[..., Iterable]


class SNMFError(ValueError):
    """Bad SNMF input or parameters (one readable line; raised before any compute)."""


# --- validation --------------------------------------------------------------------------------
def check_params(rank, sparsity, init, max_iter, patience, tol) -> None:
    """Raise SNMFError on a bad parameter (data-independent checks)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SNMFError(f"rank must be a positive integer, got {rank!r}")
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 < sparsity <= 1
    ):
        raise SNMFError(
            f"sparsity must be in (0, 1] (the fraction of neurons kept per feature) or None, got {sparsity!r}"
        )
    if init not in INITS:
        raise SNMFError(f"unknown init {init!r}: use 'random', 'svd' or 'kmeans'")
    for name, value in (("max_iter", max_iter), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SNMFError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(tol, int | float) or tol < 0:
        raise SNMFError(f"tol must be a number >= 0, got {tol!r}")


def as_matrix(A, what: str = "data") -> Tensor:
    """A as a floating 2-D tensor on its own device (float64 kept, any other dtype -> float32)."""
    A = torch.as_tensor(A)
    if A.ndim != 2:
        raise SNMFError(f"SNMF needs a 2-D matrix [n_tokens, d_mlp], got {what} of shape {tuple(A.shape)}")
    if A.dtype != torch.float64:
        A = A.float()
    return A


def check_finite(A: Tensor, what: str = "the data") -> None:
    """Raise SNMFError naming how many NaN and Inf values A holds."""
    nonfinite(int(torch.isnan(A).sum()), int(torch.isinf(A).sum()), what)


def nonfinite(n_nan: int, n_inf: int, what: str = "the data") -> None:
    if n_nan or n_inf:
        raise SNMFError(f"{what} holds {n_nan} NaN and {n_inf} Inf values; SNMF needs finite activations")


def check_rank(rank: int, n_tokens: int, d_mlp: int) -> None:
    if rank > min(n_tokens, d_mlp):
        raise SNMFError(f"rank {rank} is larger than the data: {n_tokens} tokens × {d_mlp} neurons")


# --- the steps of one iteration ----------------------------------------------------------------
def f_step(AtG: Tensor, GtG: Tensor) -> Tensor:
    """F = AᵀG (GᵀG + ridge·I)⁻¹ [d_mlp, rank] (GᵀG is symmetric, so solve the transposed system).
    Solved in float64: in float32 the 1e-6 ridge vanishes beside large GᵀG entries and a G with
    (nearly) equal columns makes the system singular; a singular one falls back to least squares."""
    eye = torch.eye(len(GtG), dtype=torch.float64, device=GtG.device)
    lhs, rhs = GtG.double() + RIDGE * eye, AtG.T.double()
    F, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info):
        F = torch.linalg.lstsq(lhs.cpu(), rhs.cpu()).solution.to(GtG.device)
    return F.T.to(AtG.dtype)


def wta_(F: Tensor, keep: int | None) -> Tensor:
    """Zero all but the `keep` largest-|F| entries of each column, in place (None: no-op)."""
    if keep is not None and keep < F.shape[0]:
        idx = F.abs().topk(keep, dim=0).indices
        mask = torch.zeros_like(F, dtype=torch.bool).scatter_(0, idx, True)
        F.mul_(mask)
    return F


def g_step_(G: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """Ding–Li–Jordan update in place: G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + eps)); P = A F, Q = FᵀF."""
    r = Q.shape[0]
    GQ = G @ torch.cat([Q.clamp(min=0), (-Q).clamp(min=0)], dim=1)  # one [n, 2r] product: G Q⁺ | G Q⁻
    num = GQ[:, r:].add_(P.clamp(min=0))
    den = GQ[:, :r].add_((-P).clamp(min=0)).add_(EPS)
    return G.mul_(num.div_(den).sqrt_())


def trace_loss(sq_norm: float, F: Tensor, AtG: Tensor, Q: Tensor, GtG: Tensor) -> float:
    """‖A − G Fᵀ‖² = ‖A‖² − 2 tr(Fᵀ AᵀG) + tr(FᵀF GᵀG), the small sums in float64 (cancellation)."""
    cross = (F.double() * AtG.double()).sum()
    quad = (Q.double() * GtG.double()).sum()
    return float(sq_norm - 2 * cross + quad)


def wta_keep(sparsity: float | None, d_mlp: int) -> int | None:
    """Entries kept per feature column: ⌈p·d_mlp⌉ (None when the WTA step is off)."""
    if sparsity is None or sparsity >= 1:
        return None
    return max(1, math.ceil(sparsity * d_mlp))


def solve_coef(
    A: Tensor, F: Tensor, max_iter: int = 500, rtol: float = 1e-7, chunk: int = 65536
) -> tuple[Tensor, float]:
    """argmin_{G ≥ 0} ‖A − G Fᵀ‖² for fixed F (a convex problem per row; unique optimum when FᵀF
    has full rank), row chunk by row chunk: start at the least-squares solution clipped at 0 and
    sweep exact coordinate minimisation over the columns (HALS: G[:,k] ← max(0, G[:,k] +
    (P[:,k] − G Q[:,k]) / Q[k,k]), P = A F, Q = FᵀF) until a sweep lowers the chunk's loss by less
    than `rtol` (relative), or `max_iter` sweeps. Unlike the multiplicative update, which only
    shrinks entries geometrically and is slow to reach the optimum's exact zeros (or to leave a
    near-zero start), HALS converges to the optimum in tens of sweeps; its G has exact zeros.
    Returns (G [n, rank], its loss ‖A − G Fᵀ‖²)."""
    Q = F.T @ F
    eye = torch.eye(len(Q), dtype=torch.float64, device=Q.device)
    Qinv_ridge = torch.linalg.pinv(Q.double() + RIDGE * eye).to(Q.dtype)  # pinv: F may have a zero column
    diag = Q.diagonal().clamp(min=1e-30)
    out, total = [], 0.0
    for lo in range(0, len(A), chunk):
        Ab = A[lo : lo + chunk].to(F.dtype)
        P = Ab @ F
        G = (P @ Qinv_ridge).clamp_(min=0)
        sq = float(Ab.double().pow(2).sum())
        prev = loss = coef_loss(sq, P, Q, G)
        for _ in range(max_iter):
            for k in range(G.shape[1]):
                step = (P[:, k] - G @ Q[:, k]).div_(diag[k])
                G[:, k] = G[:, k].add_(step).clamp_(min=0)
            loss = coef_loss(sq, P, Q, G)
            if prev - loss <= rtol * max(abs(prev), 1e-30):
                break
            prev = loss
        out.append(G)
        total += loss
    G = torch.cat(out) if out else torch.zeros(0, F.shape[1], dtype=F.dtype, device=F.device)
    return G, total


def coef_loss(sq: float, P: Tensor, Q: Tensor, G: Tensor) -> float:
    """‖A − G Fᵀ‖² = ‖A‖² − 2 Σ P∘G + Σ Q∘(GᵀG) for P = A F, Q = FᵀF."""
    return sq - 2 * float((P.double() * G.double()).sum()) + float((Q.double() * (G.T @ G).double()).sum())


# --- initialisation of G (the F step comes first, so only G0 matters) ---------------------------
def init_coef(A: Tensor, rank: int, init: str, gen: torch.Generator) -> Tensor:
    """G0 [n_tokens, rank] > 0. random: U(0,1) floored at EPS (the paper's default); svd: the top
    left singular vectors of A times √σ, floored at EPS (Ding et al. 2010 eq. 17-18); kmeans: one-hot
    cluster assignments of 15 Lloyd iterations + EPS (Ding et al. 2010)."""
    n = A.shape[0]
    if init == "random":
        G = torch.rand(n, rank, generator=gen, dtype=A.dtype, device="cpu").to(A.device)
        return G.clamp_(min=EPS)
    if init == "svd":
        return svd_coef(gram(A), A.double().sum(0), lambda: iter([A]), rank).to(A.dtype)
    return kmeans_coef(A, rank, gen)


def gram(A: Tensor) -> Tensor:
    """AᵀA [d_mlp, d_mlp] in float64."""
    A64 = A.double()
    return A64.T @ A64


def svd_coef(AtA: Tensor, colsum: Tensor, batches: Callable[[], Iterable[Tensor]], rank: int) -> Tensor:
    """clamp(U √σ, EPS) for A = U σ Vᵀ, from the Gram matrix: V, σ² = eigh(AᵀA), U √σ = A V σ^(-1/2).
    A singular vector's sign is arbitrary and the clamp keeps only its positive part, so each is
    oriented to a nonnegative column sum (1ᵀU ≥ 0, from colsum = 1ᵀA [d_mlp]). `batches()` yields
    A's rows in order (one tensor for an in-memory A), so this streams."""
    evals, evecs = torch.linalg.eigh(AtA)  # ascending
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    evecs = evecs * torch.where(colsum.double() @ evecs < 0, -1.0, 1.0).to(evecs)
    proj = evecs / evals.clamp(min=1e-12).pow(0.25)  # V σ^(-1/2), since σ = sqrt(eigenvalue)
    parts = [
        (b.double() @ proj).clamp_(min=EPS).to(b.dtype if b.is_floating_point() else torch.float32)
        for b in batches()
    ]
    return torch.cat(parts)


def kmeans_coef(A: Tensor, rank: int, gen: torch.Generator, chunk: int = 8192) -> Tensor:
    """One-hot assignments [n, rank] (+EPS) of Lloyd's k-means from `rank` distinct random rows."""
    n = A.shape[0]
    centres = A[torch.randperm(n, generator=gen)[:rank].to(A.device)].clone()
    labels = torch.empty(n, dtype=torch.long, device=A.device)
    for _ in range(KMEANS_ITERS):
        c2 = centres.pow(2).sum(1)
        for lo in range(0, n, chunk):  # ‖x − c‖² up to ‖x‖²: ‖c‖² − 2 x·c, chunked to bound memory
            labels[lo : lo + chunk] = (c2 - 2 * A[lo : lo + chunk] @ centres.T).argmin(1)
        counts = torch.bincount(labels, minlength=rank)
        sums = torch.zeros_like(centres).index_add_(0, labels, A)
        centres = sums / counts.clamp(min=1).unsqueeze(1).to(A.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # an empty cluster restarts at a random row
            centres[empty] = A[torch.randint(n, (len(empty),), generator=gen).to(A.device)]
    G = torch.full((n, rank), EPS, dtype=A.dtype, device=A.device)
    G[torch.arange(n, device=A.device), labels] = 1.0
    return G


# --- the estimator -----------------------------------------------------------------------------
COEF_MAX_ITER = 500  # multiplicative steps of `solve_coef` in transform (and the final refit of coef_)
COEF_RTOL = 1e-7  # ... stopping once a step lowers the loss by less than this fraction


class Tracker:
    """Loss curve, best iterate (any decrease) and patience (reset only by a decrease > tol below the
    loss of the last such reset, as the paper's code does)."""

    def __init__(self, tol: float, patience: int):
        self.tol, self.patience = tol, patience
        self.curve: list[float] = []
        self.best, self.best_iter, self.ref, self.stale = math.inf, -1, math.inf, 0

    def update(self, loss: float) -> bool:
        """Record one iteration's loss; True when it is the best so far."""
        self.curve.append(loss)
        improved = loss < self.best
        if improved:
            self.best, self.best_iter = loss, len(self.curve) - 1
        if loss < self.ref - self.tol:
            self.ref, self.stale = loss, 0
        else:
            self.stale += 1
        return improved

    @property
    def done(self) -> bool:
        return self.stale >= self.patience


def f_update(AtG: Tensor, GtG: Tensor, keep: int | None) -> tuple[Tensor, Tensor]:
    """Steps 1-3: F from the closed form, WTA, and F's columns times ‖G[:,k]‖; returns (F, the norms
    the caller divides G's columns by)."""
    F = wta_(f_step(AtG, GtG), keep)
    norms = GtG.diagonal().clamp(min=0).sqrt().clamp(min=1e-8)
    return F.mul_(norms), norms


def _iterate(items: Iterable, progress: Progress | bool | None, total: int) -> Iterable:
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(items, total=total, desc="SNMF")
    return progress(items, total=total, desc="SNMF") if callable(progress) else items


class SNMF(BaseEstimator):
    """Sparse semi-NMF, scikit-learn style: `fit(A)` with A [n_tokens, d_mlp] learns
    `components_` = F [d_mlp, rank] (neuron × feature, mixed sign, ⌈sparsity·d_mlp⌉ nonzeros per
    column) and `coef_` = G [n_tokens, rank] ≥ 0 with A ≈ coef_ @ components_ᵀ (see the module
    docstring for the iteration). Also learned: `loss_curve_` (‖A − GFᵀ‖² per iteration),
    `n_iter_`, `best_iter_` (0-based index of the returned F in loss_curve_), `best_loss_`
    (= min(loss_curve_)), `loss_` (loss of the returned components_ and coef_), `n_features_in_`.
    Runs on A's device in A's dtype (float64 kept, anything else float32)."""

    def __init__(
        self,
        rank: int,
        sparsity: float | None = 0.01,
        init: str = "random",
        max_iter: int = 2000,
        patience: int = 200,
        tol: float = 1e-4,
        seed: int = 0,
        refit_coef: bool = True,
    ):
        self.rank = rank
        self.sparsity = sparsity
        self.init = init
        self.max_iter = max_iter
        self.patience = patience
        self.tol = tol
        self.seed = seed
        self.refit_coef = refit_coef

    def _check(self) -> None:
        check_params(self.rank, self.sparsity, self.init, self.max_iter, self.patience, self.tol)

    def fit(self, A, y=None, progress: Progress | bool | None = None) -> SNMF:
        """Fit on A [n_tokens, d_mlp]; `progress`: True for a tqdm bar, or a wrapper
        `progress(iterable, total=, desc=)` such as `Context.progress`. Every check runs first."""
        self._check()
        A = as_matrix(A)
        check_rank(self.rank, *A.shape)
        check_finite(A)
        gen = torch.Generator().manual_seed(self.seed)
        G = init_coef(A, self.rank, self.init, gen)
        keep = wta_keep(self.sparsity, A.shape[1])
        sq = sum(float(A[lo : lo + 65536].double().pow(2).sum()) for lo in range(0, len(A), 65536))
        AtG, GtG = A.T @ G, G.T @ G
        track, best_F, best_G = Tracker(self.tol, self.patience), None, torch.empty_like(G)
        for _ in _iterate(range(self.max_iter), progress, self.max_iter):
            F, norms = f_update(AtG, GtG, keep)
            G.div_(norms)
            Q = F.T @ F
            g_step_(G, A @ F, Q)
            torch.matmul(A.T, G, out=AtG)
            GtG = G.T @ G
            if track.update(trace_loss(sq, F, AtG, Q, GtG)):
                best_F = F
                best_G.copy_(G)
            if track.done:
                break
        return self._finish(track, best_F, best_G, lambda: solve_coef(A, best_F, COEF_MAX_ITER, COEF_RTOL))

    def _finish(
        self, track: Tracker, F: Tensor | None, G: Tensor, refit: Callable[[], tuple[Tensor, float]]
    ) -> SNMF:
        if F is None:
            raise SNMFError("the SNMF fit diverged: no iteration had a finite loss")
        self.components_, self.n_features_in_ = F, F.shape[0]
        self.loss_curve_, self.n_iter_ = track.curve, len(track.curve)
        self.best_iter_, self.best_loss_ = track.best_iter, track.best
        self.coef_, self.loss_ = refit() if self.refit_coef else (G, track.best)
        return self

    def _fitted(self) -> Tensor:
        check_is_fitted(self, "components_", msg="this SNMF is not fitted yet: call fit(A) first")
        return self.components_

    def transform(self, A) -> Tensor:
        """Nonnegative coefficients G [n, rank] of rows A [n, d_mlp] for the fitted F: argmin_{G≥0}
        ‖A − G Fᵀ‖² by `solve_coef` (multiplicative updates from the least-squares start, to
        convergence or COEF_MAX_ITER steps). With refit_coef=True, fit ran this very solver on the
        training rows, so transform(A_train) reproduces coef_ (to float rounding)."""
        F = self._fitted()
        A = as_matrix(A)
        if A.shape[1] != F.shape[0]:
            raise SNMFError(f"this SNMF was fitted on rows of {F.shape[0]} neurons, got rows of {A.shape[1]}")
        check_finite(A)
        return solve_coef(A, F.to(A.device), COEF_MAX_ITER, COEF_RTOL)[0]

    def fit_stream(
        self, batches, device=None, g_steps: int = 1, progress: Progress | bool | None = None
    ) -> SNMF:
        """Fit from a zero-argument callable `batches()` that yields the same row blocks
        [n_b, d_mlp] in the same order on every call (e.g. `snmf_stream.store_batches(store, site)`),
        one pass per iteration, holding only G and the sufficient statistics in memory; `device`
        defaults to the first block's. The algorithm: `workbench.sae.snmf_stream`."""
        from workbench.sae.snmf_stream import fit_stream

        return fit_stream(self, batches, device, g_steps, progress)

    def fit_transform(self, A, y=None, progress: Progress | bool | None = None) -> Tensor:
        """fit(A), then the training coefficients coef_."""
        return self.fit(A, progress=progress).coef_

    def inverse_transform(self, G) -> Tensor:
        """Reconstructed rows G @ Fᵀ [n, d_mlp]."""
        F = self._fitted()
        return torch.as_tensor(G).to(F) @ F.T
