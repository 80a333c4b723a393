"""Causal tracing throughput: batched restorations vs the paper's one-restoration-per-forward loop.

    python benchmarks/factual.py [--model smollm2-135m] [--facts known] [--n-facts 1] [--ref-states 60]

Same model, facts and noise draws for both. The batched sweep runs every state of each fact (all
three kinds, every token x layer). The reference loop (one full forward per state) runs
`--ref-states` of them, taken evenly across the list, and its time is extrapolated per state
(each state costs it one full forward of the same shape; 0 = run it on every state). Prints wall
times, facts/minute, the speed-up and the largest |difference| between the two methods'
P(attribute) values on the states both ran.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from workbench import facts as F
from workbench.analyses.factual import tracing
from workbench.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", default="known")
    ap.add_argument("--n-facts", type=int, default=1)
    ap.add_argument("--ref-states", type=int, default=60, help="states the reference runs per fact (0 = all)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--also-whole-mlps", action="store_true", help="also time the batched sweep with every MLP run whole"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    prepared = [F.prepare(f, model) for f in F.load_facts(args.facts).facts[:64]]
    known = F.split_known(model, prepared)[0][: args.n_facts]
    sigma = tracing.subject_std(model, known)
    window = tracing.default_window(model.cfg.n_layers)
    t_batched = t_ref = t_whole = diff = 0.0
    n_states = 0
    for p in known:
        tracer = tracing.Tracer(model, p.tokens, p.start, p.end, p.target, 3 * sigma, args.samples, 1, window)
        states = tracing.all_states(
            model.cfg.n_layers, len(p.tokens), 0, severed=False
        )  # every token x layer
        step = max(1, len(states) // args.ref_states) if args.ref_states else 1
        picked = list(range(0, len(states), step))[: args.ref_states or None]
        per_pass = max(1, args.max_batch_tokens // (args.samples * len(p.tokens)))
        t = time.perf_counter()
        batched = tracing.trace(tracer, states, per_pass)
        t_batched += time.perf_counter() - t
        if args.also_whole_mlps:  # the same sweep before MLPs were restricted to what a state changes
            t = time.perf_counter()
            with _whole_mlps():
                whole = tracing.trace(tracer, states, per_pass)
            t_whole += time.perf_counter() - t
            diff = max(diff, float((whole - batched).abs().max()))
        t = time.perf_counter()
        reference = tracing.reference_probs(tracer, [states[i] for i in picked])
        t_ref += (time.perf_counter() - t) * len(states) / len(picked)  # extrapolated to every state
        diff = max(diff, float((batched[picked] - reference).abs().max()))
        n_states += len(states)
    per_min = {k: 60 * len(known) / v for k, v in (("batched", t_batched), ("reference", t_ref))}
    print(
        f"model {args.model}, {len(known)} facts, {n_states} states, {args.samples} draws, "
        f"reference on {args.ref_states or 'all'} states per fact (time extrapolated)"
    )
    print(f"batched   {t_batched:8.1f} s  {per_min['batched']:.3f} facts/min")
    print(f"reference {t_ref:8.1f} s  {per_min['reference']:.3f} facts/min")
    if args.also_whole_mlps:
        print(f"batched, whole MLPs {t_whole:8.1f} s  ({t_whole / t_batched:.2f}x the batched time)")
    print(f"speed-up {t_ref / t_batched:.2f}x   max |P batched - P reference| = {diff:.3g}")


@contextlib.contextmanager
def _whole_mlps():
    plain = tracing.Tracer._mlps_where_changed
    tracing.Tracer._mlps_where_changed = lambda self, states: contextlib.nullcontext()
    try:
        yield
    finally:
        tracing.Tracer._mlps_where_changed = plain


if __name__ == "__main__":
    main()
