"""The hand-run dictionaries job on smollm2-135m: ≥1M stored tokens at layer 15, a TopK SAE on the
residual stream and a transcoder on the MLP (its true input `mlp.hook_in`, after the norm's weight),
both with the default recipe (sae/recipe.py: b_dec at the geometric median, dead window scaled to
the run, special tokens and norm outliers left out, every 20th sequence held out), evaluated on
training rows and on the held-out sequences of the same store, with and without the outlier rule.
Not run in CI (about an hour on a 2-core CPU); every step is cached or resumable, so re-running
after a kill continues where it stopped.

    bash scripts/fetch_shakespeare.sh      # third corpus: WikiText-2 + TinyStories hold ~0.54M tokens
    .venv/bin/python scripts/smollm2_dictionaries.py [--dashboards]
    .venv/bin/python scripts/smollm2_dictionaries.py --topk-only [--old-recipe] [--override JSON]

`--topk-only` trains and evaluates the TopK SAE alone; `--old-recipe` trains it the way train-sae
did before recipe v2 (b_dec at 0, norm outliers kept, a fixed 250k-token dead window, no
resampling), so old and new are measured under the same definitions; `--override` sets any other
train-sae option (JSON).
"""

from __future__ import annotations

import argparse
import json

from workbench import api, paths

SHARED = "/work/shared/data"
LAYER = 15
SITES = (
    f"blocks.{LAYER}.hook_resid_post",
    f"blocks.{LAYER}.mlp.hook_in",
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
OLD_RECIPE = dict(
    b_dec_init="zeros",
    outlier_factor=0.0,
    dead_window_tokens=250_000,
    dead_window_frac=1.0,
    resample_dead=False,
)
# (name, sae-eval options): the recipe's rows, and the pre-rule definition (outliers kept in)
EVALS = (
    ("train", {"split": "train"}),
    ("held_out", {"split": "held_out"}),
    ("train, outliers kept", {"split": "train", "outlier_factor": 0}),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--dashboards", action="store_true", help="also build the SAE's latent dashboards")
    ap.add_argument("--dashboard-tokens", type=int, default=1 << 17)
    ap.add_argument("--out", default="", help="also write the report (JSON) here")
    ap.add_argument("--topk-only", action="store_true", help="train and evaluate the TopK SAE alone")
    ap.add_argument("--old-recipe", action="store_true", help="train the TopK SAE with the pre-v2 recipe")
    ap.add_argument("--override", default="{}", help="other train-sae options for the TopK SAE (JSON)")
    args = ap.parse_args()
    root = paths.stores_dir() / "smollm2-L15-1M"
    done = root.exists() and api.open_store(root).complete  # read, never rewrite, a finished capture
    store = (
        api.open_store(root)
        if done
        else api.capture(
            sites=SITES,
            data=CORPUS,
            n_tokens=args.tokens,
            dtype="float16",
            batch_size=16,
            shard_tokens=16384,
            out=str(root),
        )
    )
    report: dict = {"store": str(store.root), "rows": store.n_rows}

    def save() -> None:  # after every step: a killed job still leaves what finished
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)

    extra = (OLD_RECIPE if args.old_recipe else {}) | json.loads(args.override)
    sae = api.run("train-sae", store=str(store.root), site=SITES[0], arch="topk", k=32, **COMMON, **extra)
    report["topk"] = {"train": sae.summary(), "rows": sae.rows, "dead_window_tokens": sae.dead_window_tokens}
    save()
    if args.topk_only:
        _evaluate(report, sae.dictionary, store, save)
        print(json.dumps(report, indent=1, default=str))
        return
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
    report["transcoder"] = {"train": tc.summary(), "rows": tc.rows}
    report["dictionaries"] = both = f"{sae.dictionary},{tc.dictionary}"
    save()
    _evaluate(report, both, store, save)
    if args.dashboards:
        dash = api.run(
            "dashboards", store=str(store.root), dictionary=sae.dictionary, n_tokens=args.dashboard_tokens
        )
        report["dashboards"] = {"key": dash.cache_key, "summary": dash.summary(), "examples": _examples(dash)}
        save()
    print(json.dumps(report, indent=1, default=str))


def _evaluate(report: dict, dictionaries: str, store, save) -> None:
    for name, opts in EVALS:
        res = api.run(
            "sae-eval",
            dictionary=dictionaries,
            store=str(store.root),
            n_tokens=16384,
            n_seqs=32,
            batch_size=8,
            **opts,
        )
        report[f"eval {name}"] = res.summary()
        save()


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
