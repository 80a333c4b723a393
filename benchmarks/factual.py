"""Causal tracing throughput: batched restorations vs the paper's one-restoration-per-forward loop.

    python benchmarks/factual.py [--model smollm2-135m] [--facts known] [--n-facts 1] [--states 40]

Same model, facts, noise draws and states for both; `--states` times only that many states per
fact (taken evenly across the fact's full list: all three kinds, every token x layer) and
extrapolates facts per minute to the full list. Prints wall times, facts/minute, the speed-up and
the largest |difference| between the two methods' P(attribute) values.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--states", type=int, default=40, help="states timed per fact (0 = all)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    prepared = [F.prepare(f, model) for f in F.load_facts(args.facts).facts[:64]]
    known = F.split_known(model, prepared)[0][: args.n_facts]
    sigma = tracing.subject_std(model, known)
    window = tracing.default_window(model.cfg.n_layers)
    full = timed = t_batched = t_ref = diff = 0.0
    for p in known:
        tracer = tracing.Tracer(model, p.tokens, p.start, p.end, p.target, 3 * sigma, args.samples, 1, window)
        states = tracing.all_states(
            model.cfg.n_layers, len(p.tokens), 0, severed=False
        )  # every token x layer
        picked = states if not args.states else states[:: max(1, len(states) // args.states)][: args.states]
        per_pass = max(1, args.max_batch_tokens // (args.samples * len(p.tokens)))
        t = time.perf_counter()
        batched = tracing.trace(tracer, picked, per_pass)
        t_batched += time.perf_counter() - t
        t = time.perf_counter()
        reference = tracing.reference_probs(tracer, picked)
        t_ref += time.perf_counter() - t
        diff = max(diff, float((batched - reference).abs().max()))
        full, timed = full + len(states), timed + len(picked)
    scale = full / timed  # extrapolate to every state of every fact
    per_min = {k: 60 * len(known) / (v * scale) for k, v in (("batched", t_batched), ("reference", t_ref))}
    print(
        f"model {args.model}, {len(known)} facts, {int(full)} states ({int(timed)} timed), {args.samples} draws"
    )
    print(f"batched   {t_batched:8.1f} s timed  {per_min['batched']:.3f} facts/min")
    print(f"reference {t_ref:8.1f} s timed  {per_min['reference']:.3f} facts/min")
    print(f"speed-up {t_ref / t_batched:.2f}x   max |P batched - P reference| = {diff:.3g}")


if __name__ == "__main__":
    main()
