"""SNMF cost: (1) one iteration of `SNMF.fit` against its two dominant products, (2) the streaming
fit (`SNMF.fit_stream` reading a store site shard by shard every pass) against a straightforward
full-batch implementation of the published algorithm (`reference` below, written from the paper's
description: A [d_mlp, n] in memory, inverse of GᵀG + 1e-6·I, threshold WTA, explicit residual for
the loss) on the same rows, same G0 and the same number of iterations: time, peak memory, loss.

    flock /tmp/lead/heavy.lock .venv/bin/python benchmarks/snmf.py \\
        --store ~/.cache/workbench/stores/<id> --site blocks.15.mlp.hook_post --rank 100

Each measurement runs in its own child process so `ru_maxrss` (the peak resident set, which also
counts torch's allocations that tracemalloc does not see) belongs to that variant alone; the
figure reported is the peak minus the resident set right after loading torch and the store.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def keep_mask(store, rows: int | None) -> torch.Tensor:
    """Every row but BOS (as `sae.data.default_keep`), only the first `rows` of them if given."""
    from workbench.sae.data import default_keep

    keep = default_keep(store)
    if rows is not None:
        keep &= keep.cumsum(0) <= rows
    return keep


def load_rows(store_path: str, site: str, rows: int | None = None) -> torch.Tensor:
    from workbench.api import open_store

    store = open_store(store_path)
    return store.read(site)[keep_mask(store, rows)].flatten(1).float()


def reference(A: torch.Tensor, G: torch.Tensor, K: int, sparsity: float, iters: int) -> float:
    """The published iteration as written (A is [d_mlp, n] here, the paper's orientation); returns
    the best loss ‖A − F Gᵀ‖² over `iters` iterations."""
    best = math.inf
    keep = max(1, math.ceil(sparsity * A.shape[0]))
    for _ in range(iters):
        F = A @ G @ torch.linalg.inv(G.T @ G + 1e-6 * torch.eye(K))
        thresh = F.abs().topk(keep, dim=0).values[-1]
        F = F * (F.abs() >= thresh)
        norms = G.norm(dim=0).clamp(min=1e-8)
        G, F = G / norms, F * norms
        P, Q = A.T @ F, F.T @ F
        num = (P.abs() + P) / 2 + G @ ((Q.abs() - Q) / 2)
        den = (P.abs() - P) / 2 + G @ ((Q.abs() + Q) / 2) + 1e-6
        G = G * torch.sqrt(num / den)
        best = min(best, float(torch.linalg.norm(A - F @ G.T) ** 2))
    return best


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    from workbench.api import open_store
    from workbench.sae.snmf import SNMF
    from workbench.sae.snmf_stream import store_batches

    if args.part == "stream":
        store = open_store(args.store)
        base = rss_mb()
        est = SNMF(args.rank, max_iter=args.iters, patience=args.iters, tol=0.0, refit_coef=False)
        t0 = time.perf_counter()
        est.fit_stream(store_batches(store, args.site, keep_mask(store, args.rows)))
        return dict(seconds=time.perf_counter() - t0, peak_mb=rss_mb() - base, loss=est.best_loss_)
    base = (
        rss_mb()
    )  # before the rows: the reference's peak includes its in-memory A, as the stream's its shards
    A = load_rows(args.store, args.site, args.rows)
    if args.part == "reference":
        gen = torch.Generator().manual_seed(0)  # the same G0 draw as SNMF(seed=0)
        G0 = torch.rand(A.shape[0], args.rank, generator=gen).clamp_(min=1e-6)
        At = A.T.contiguous()
        t0 = time.perf_counter()
        loss = reference(At, G0, args.rank, 0.01, args.iters)
        return dict(seconds=time.perf_counter() - t0, peak_mb=rss_mb() - base, loss=loss)
    return ratio(A, args)


def ratio(A: torch.Tensor, args) -> dict:
    """Seconds per SNMF iteration (difference of two fits of lo and hi iterations, so init and
    setup cancel) ÷ seconds of A F plus Aᵀ G on the same shapes; medians of `reps` interleaved."""
    from workbench.sae.snmf import SNMF

    F, G = torch.randn(A.shape[1], args.rank), torch.rand(A.shape[0], args.rank)
    lo, hi = 3, 3 + args.ratio_iters

    def fit(n: int) -> float:
        t0 = time.perf_counter()
        SNMF(args.rank, max_iter=n, patience=n, tol=0.0, refit_coef=False).fit(A)
        return time.perf_counter() - t0

    def products() -> float:
        t0 = time.perf_counter()
        A @ F
        A.T @ G
        return time.perf_counter() - t0

    iters, prods = [], []
    for _ in range(args.reps):
        iters.append((fit(hi) - fit(lo)) / (hi - lo))
        prods.append(sorted(products() for _ in range(5))[2])
    it, pr = sorted(iters)[len(iters) // 2], sorted(prods)[len(prods) // 2]
    return dict(iteration_s=it, products_s=pr, ratio=it / pr, iterations=iters, products=prods)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--site", default="blocks.15.mlp.hook_post")
    p.add_argument("--rank", type=int, default=100)
    p.add_argument("--iters", type=int, default=100, help="iterations of the streaming and reference fits")
    p.add_argument("--ratio-iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, help="use only the first ROWS kept rows (default: all)")
    p.add_argument("--parts", default="ratio,stream,reference", help="which parts to run, comma-separated")
    p.add_argument("--part", choices=["ratio", "stream", "reference"], help="(internal) run one part here")
    args = p.parse_args()
    if args.part:
        print(json.dumps(child(args)))
        return
    out = {"load_average_start": os.getloadavg()[0], "args": vars(args)}
    for part in args.parts.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part]
        out[part] = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        print(part, out[part], flush=True)
    out["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
