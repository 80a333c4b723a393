"""Bigram-mask training cost: one mask-training step ÷ the model's own forward + backward.

    flock /tmp/lead/heavy.lock python benchmarks/bigram.py [--model smollm2-135m] [--batch 8] [--ctx 64]

Same batch (WikiText-2 test, packed `--ctx`-token sequences) and the same loss (CE to the bigram
distribution of WikiText-2 test) for both:
  * reference: the plain model, forward + backward with gradients on its own weights (what any
    fine-tuning step costs, without an optimiser);
  * mask step: `analyses.bigram.train._step` — σ(T·s) over every mask entry, w·σ(T·s) for every
    attention/MLP matrix, forward, backward into the logits, AdamW on the logits, undecided count.
Reports median seconds per step (after one warm-up each; the mask step amortises the undecided
count, run on 1 logged step in 10), their ratio (target ≤ 1.5×), the mask
entry count, and peak RSS (ru_maxrss) after the reference phase and after the mask phase.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import time
from pathlib import Path

import torch

from workbench import data, masks
from workbench.analyses.bigram import train
from workbench.bigram import bigram_model
from workbench.models import load_model

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test" / "wiki.test.raw"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(WIKITEXT))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tok = model.tokenizer
    specials = [tok.bos_token_id, tok.eos_token_id]
    target = bigram_model(args.data, tok, model.cfg.d_vocab, progress=False)
    seqs = [s.tokens for s in itertools.islice(data.pack(args.data, tok, args.ctx), args.batch)]
    batch = torch.tensor(seqs)
    prev = target.contexts(batch.flatten(), specials)
    rss_loaded = peak_rss_gb()

    def reference() -> None:
        model.zero_grad(set_to_none=True)
        log_q = model(batch)[..., : target.vocab_size].flatten(0, 1).log_softmax(-1)
        target.cross_entropy(prev, log_q).mean().backward()

    t_ref = timed(reference, args.reps)
    model.zero_grad(set_to_none=True)
    rss_ref = peak_rss_gb()

    weights = {n: w.detach() for n, w in masks.maskable(model).items()}
    logits = train.MaskLogits(weights)
    settings = train.TrainSettings()  # log_every 10: the undecided count runs on 1 step in 10
    opt = train.make_optimizer(logits.s, settings)
    with train.frozen(model):
        plain = timed(
            lambda: train._step(model, weights, logits, opt, settings, 0, batch, target, specials), args.reps
        )
        counted = timed(
            lambda: train._step(model, weights, logits, opt, settings, 9, batch, target, specials), args.reps
        )
    t_mask = (9 * plain + counted) / 10
    rss_mask = peak_rss_gb()
    print(f"model {args.model}  batch {args.batch} x {args.ctx} tokens  threads {args.threads}")
    print(f"mask entries {logits.n:,} ({logits.n * 4 / 2**30:.2f} GiB per fp32 copy)")
    print(f"reference forward+backward  {t_ref:.2f} s/step (median of {args.reps})")
    print(f"mask-training step          {plain:.2f} s/step, {counted:.2f} s with the undecided count")
    print(f"  amortised (count 1 in 10)  {t_mask:.2f} s/step")
    print(f"ratio                       {t_mask / t_ref:.2f}x (target <= 1.5x)")
    print(
        f"peak RSS: model loaded {rss_loaded:.2f} GB, after reference {rss_ref:.2f} GB, after mask steps {rss_mask:.2f} GB"
    )


if __name__ == "__main__":
    main()
