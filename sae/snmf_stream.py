"""Streaming SNMF: the paper's full-batch iteration with the data read batch by batch, one pass per
iteration, for a store site that does not fit in memory.

Algorithm (exact block streaming, not an approximation): every quantity the iteration needs from A
is a sum over row blocks, so only G [n_tokens, rank] (rank/d_mlp of A's size: 6.5 % for rank 100 on
SmolLM2's d_mlp 1536) and the sufficient statistics AᵀG [d_mlp, rank], GᵀG [rank, rank] stay in
memory. Pass t, with F from the statistics of pass t-1 (F step, WTA, column rescale):
    for each block A_b (rows lo:hi): G_b ← G_b / norms; P_b = A_b F; G_b ← DLJ update(G_b, P_b, FᵀF)
    (`g_steps` times, reusing P_b); AᵀG += A_bᵀ G_b; GᵀG += G_bᵀ G_b
and the loss of (F, G) follows from the traces. With g_steps=1 this is the full-batch iteration up to
the summation order of AᵀG (the same G0 for init='random': the per-block draws continue one
generator). g_steps > 1 makes the cheap r×r part of each pass do more work per read of A (the
multiplicative update never raises the loss for fixed F, so passes only get better). Memory:
O((n_tokens + d_mlp)·rank + one block); time: one read of the data per iteration.
Inits: 'random' and 'svd' (one extra pass for the Gram matrix AᵀA [d_mlp, d_mlp]); 'kmeans' needs
every row at once and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from workbench.sae.snmf import (
    COEF_MAX_ITER,
    COEF_RTOL,
    EPS,
    SNMFError,
    Tracker,
    _iterate,
    check_rank,
    f_update,
    g_step_,
    nonfinite,
    solve_coef,
    svd_coef,
    trace_loss,
    wta_keep,
)

Batches = Callable[[], Iterable[Tensor]]


def store_batches(store, site: str, keep: Tensor | None = None) -> Batches:
    """A callable yielding the site's rows in `keep` ([n_rows] bool; default every row but BOS, as
    `sae.data.default_keep`), shard by shard in stored order, float32 [rows, d]: the same rows in
    the same order on every call, as `fit_stream` needs."""
    from workbench.sae.data import default_keep

    keep = default_keep(store) if keep is None else keep

    def batches() -> Iterator[Tensor]:
        for j, rec in enumerate(store.records(site)):
            mask = keep[rec.row_start : rec.row_end]
            if mask.any():
                yield store.shard(site, j)[mask].flatten(1).float()

    return batches


def _blocks(batches: Batches, device, dtype) -> Iterator[Tensor]:
    for b in batches():
        b = torch.as_tensor(b)
        if b.ndim != 2:
            raise SNMFError(
                f"SNMF needs 2-D batches [n_tokens, d_mlp], got a batch of shape {tuple(b.shape)}"
            )
        yield b.to(device=device, dtype=dtype)


def first_pass(est, batches: Batches, device, dtype) -> tuple[Tensor, list[int], float]:
    """Read every block once: block sizes, ‖A‖², NaN/Inf count, the random G0 (or the Gram matrix
    for init='svd'); raise SNMFError on bad data before any iteration."""
    gen = torch.Generator().manual_seed(est.seed)
    sizes, parts, sq, n_nan, n_inf, AtA, colsum, d = [], [], 0.0, 0, 0, None, None, 0
    for b in _blocks(batches, device, dtype):
        if sizes and b.shape[1] != d:
            raise SNMFError(f"block {len(sizes)} has rows of {b.shape[1]} neurons, the first block {d}")
        sizes.append(len(b))
        d = b.shape[1]
        n_nan, n_inf = n_nan + int(torch.isnan(b).sum()), n_inf + int(torch.isinf(b).sum())
        if n_nan or n_inf:
            continue
        sq += float(b.double().pow(2).sum())
        if est.init == "random":
            parts.append(torch.rand(len(b), est.rank, generator=gen, dtype=dtype).to(device).clamp_(min=EPS))
        else:
            AtA = (b.double().T @ b.double()) if AtA is None else AtA.addmm_(b.double().T, b.double())
            colsum = b.double().sum(0) if colsum is None else colsum.add_(b.double().sum(0))
    if not sizes:
        raise SNMFError("the batches are empty: no rows to fit")
    nonfinite(n_nan, n_inf)
    check_rank(est.rank, sum(sizes), d)
    G = (
        torch.cat(parts)
        if parts
        else svd_coef(AtA, colsum, lambda: _blocks(batches, device, dtype), est.rank)
    )
    return G.to(dtype), sizes, sq


def fit_stream(est, batches: Batches, device=None, g_steps: int = 1, progress=None):
    """Fit `est` (an SNMF) on the rows `batches()` yields; see the module docstring."""
    est._check()
    if est.init == "kmeans":
        raise SNMFError(
            "init 'kmeans' needs every row in memory: use fit(A), or init 'random' or 'svd' to stream"
        )
    if isinstance(g_steps, bool) or not isinstance(g_steps, int) or g_steps < 1:
        raise SNMFError(f"g_steps must be a positive integer, got {g_steps!r}")
    head = _peek(batches)
    device = torch.device(device) if device is not None else head.device
    dtype = torch.float64 if head.dtype == torch.float64 else torch.float32
    G, sizes, sq = first_pass(est, batches, device, dtype)
    keep = wta_keep(est.sparsity, head.shape[-1])
    AtG, GtG = _stats(batches, G, sizes, device, dtype)
    track, best_F, best_G = Tracker(est.tol, est.patience), None, torch.empty_like(G)
    for _ in _iterate(range(est.max_iter), progress, est.max_iter):
        F, norms = f_update(AtG, GtG, keep)
        Q = F.T @ F
        G.div_(norms)
        AtG, GtG = torch.zeros_like(AtG), torch.zeros_like(GtG)
        for b, G_b in zip(_checked(batches, sizes, device, dtype), G.split(sizes)):
            P = b @ F
            for _ in range(g_steps):
                g_step_(G_b, P, Q)
            AtG.addmm_(b.T, G_b)
            GtG.addmm_(G_b.T, G_b)
        if track.update(trace_loss(sq, F, AtG, Q, GtG)):
            best_F = F
            best_G.copy_(G)
        if track.done:
            break
    return est._finish(track, best_F, best_G, lambda: _refit(batches, best_F, sizes, device, dtype))


def _stats(batches: Batches, G: Tensor, sizes: list[int], device, dtype) -> tuple[Tensor, Tensor]:
    AtG = sum(b.T @ G_b for b, G_b in zip(_checked(batches, sizes, device, dtype), G.split(sizes)))
    return AtG, G.T @ G


def _refit(batches: Batches, F: Tensor, sizes: list[int], device, dtype) -> tuple[Tensor, float]:
    parts = [solve_coef(b, F, COEF_MAX_ITER, COEF_RTOL) for b in _checked(batches, sizes, device, dtype)]
    return torch.cat([g for g, _ in parts]), sum(loss for _, loss in parts)


def _checked(batches: Batches, sizes: list[int], device, dtype) -> Iterator[Tensor]:
    """The blocks again, each checked against the first pass's size (G's rows are tied to them)."""
    i = -1
    for i, b in enumerate(_blocks(batches, device, dtype)):
        if i >= len(sizes) or len(b) != sizes[i]:
            raise SNMFError(
                f"the batches changed between passes: block {i} has {len(b)} rows, the first pass had "
                f"{sizes[i] if i < len(sizes) else 'no such block'}; fit_stream needs the same rows in the same order"
            )
        yield b
    if i + 1 != len(sizes):
        raise SNMFError(
            f"the batches changed between passes: {i + 1} blocks, the first pass had {len(sizes)}"
        )


def _peek(batches: Batches) -> Tensor:
    for b in batches():
        return torch.as_tensor(b)
    raise SNMFError("the batches are empty: no rows to fit")
