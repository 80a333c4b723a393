"""The hand-run dictionaries job on smollm2-135m: ≥1M stored tokens at layer 15, a TopK SAE on the
residual stream and a transcoder on the MLP, their evaluation (in-sample and on held-out text) and
feature dashboards. Not run in CI (about an hour on a 2-core CPU); every step is cached or resumable,
so re-running after a kill continues where it stopped.

    bash scripts/fetch_shakespeare.sh      # third corpus: WikiText-2 + TinyStories hold ~0.54M tokens
    .venv/bin/python scripts/smollm2_dictionaries.py
"""

from __future__ import annotations

import argparse
import json

from workbench import api, paths
from workbench.data import BUNDLED_TEXT

SHARED = "/work/shared/data"
LAYER = 15
SITES = (
    f"blocks.{LAYER}.hook_resid_post",
    f"blocks.{LAYER}.mlp.hook_in",  # the MLP's true input (after the norm's weight γ)
    f"blocks.{LAYER}.hook_mlp_out",
)
CORPUS = ",".join(
    (
        f"{SHARED}/wikitext-2-raw-test/wiki.test.raw",
        f"{SHARED}/tinystories-sample/tinystories_1000.json",
        "~/.cache/workbench/data/shakespeare.txt",
    )
)
COMMON = dict(
    d_sae=4608, lr=4e-4, batch_size=1024, lr_decay_steps=200, checkpoint_every=100, eval_tokens=16384
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--dashboard-tokens", type=int, default=1 << 17)
    args = ap.parse_args()
    store = api.capture(
        sites=SITES,
        data=CORPUS,
        n_tokens=args.tokens,
        dtype="float16",
        batch_size=16,
        shard_tokens=16384,
        out=str(paths.stores_dir() / "smollm2-L15-1M"),
    )
    held_out = api.capture(sites=SITES, data=str(BUNDLED_TEXT), n_tokens=4096, dtype="float16")
    sae = api.run(
        "train-sae",
        store=str(store.root),
        site=SITES[0],
        arch="topk",
        k=32,
        dead_window_tokens=250_000,
        **COMMON,
    )
    tc = api.run(
        "train-sae",
        store=str(store.root),
        site=SITES[1],
        target_site=SITES[2],
        arch="transcoder",
        l1_coefficient=5.0,
        sparsity_warm_up_steps=200,
        **COMMON,
    )
    both = f"{sae.dictionary},{tc.dictionary}"
    report = {
        "store": str(store.root),
        "rows": store.n_rows,
        "train": {"topk": sae.summary(), "transcoder": tc.summary()},
        "dictionaries": both,
        "eval_in_sample": api.run(
            "sae-eval", dictionary=both, store=str(store.root), n_tokens=16384, n_seqs=64, batch_size=8
        ).summary(),
        "eval_held_out": api.run(
            "sae-eval", dictionary=both, store=str(held_out.root), n_tokens=4096, n_seqs=15, batch_size=5
        ).summary(),
    }
    dash = api.run(
        "dashboards", store=str(store.root), dictionary=sae.dictionary, n_tokens=args.dashboard_tokens
    )
    report["dashboards"] = {"key": dash.cache_key, "summary": dash.summary(), "examples": _examples(dash)}
    print(json.dumps(report, indent=1, default=str))


def _examples(dash, n: int = 6) -> list[dict]:
    """A few live latents across the density range: top tokens, logits, correlated neighbours."""
    order = [int(i) for i in dash.density.argsort(descending=True) if dash.density[i] > 0]
    picks = [order[int(q * (len(order) - 1))] for q in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9)][:n]
    out = []
    for i in picks:
        d = dash.latent(i)
        out.append(
            {
                "latent": i,
                "density": round(d["density"], 5),
                "max_act": round(d["max_act"], 3),
                "top_contexts": ["".join(c["tokens"]).replace("\n", "↵") for c in d["top"][:3]],
                "promoted": [t for t, _ in d["pos_logits"][:6]],
                "correlated": d["correlated"][:3],
            }
        )
    return out


if __name__ == "__main__":
    main()
