"""The real SNMF run behind data/snmf_notes.md (Analysis and steering sections), one stage per
heavy-lock slot (on a loaded 2-core machine the capture ran at ~50 tok/s and the rank-100 SNMF at
~1.4 s per iteration, so a stage can exceed 10 min; give it no shorter `timeout`):

    flock /tmp/lead/heavy.lock .venv/bin/python scripts/snmf_smollm2.py fit    # store, SNMF, TopK SAE
    flock /tmp/lead/heavy.lock .venv/bin/python scripts/snmf_smollm2.py steer  # the comparison

Each stage is the CLI's analyses through `workbench.api` (cached: a rerun is a cache hit) and prints
what the notes quote: example features (contexts, vocabulary projection) and the comparison table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import workbench as wb

DATA = "/work/shared/data/wikitext-2-raw-test/wiki.test.raw"
SITE = "blocks.15.mlp.hook_post"
SNMF = {"rank": 100, "n_tokens": 20000}
SAE = {
    "site": SITE,
    "arch": "topk",
    "d_sae": 3072,
    "k": 16,
    "steps": 150,
    "batch_size": 1024,
    "eval_tokens": 2048,
}
OUT = Path("/tmp/s2logs")


def fit():
    store = wb.capture(model="smollm2-135m", sites=(SITE,), data=DATA, n_tokens=20000)
    r = wb.run("snmf", store=str(store.root), **SNMF)
    print(f"store {store.root}\nsnmf {r.cache_key} dictionary {r.dictionary}")
    print(f"tokens {r.n_tokens} rank {r.rank} iters {r.n_iter} loss {r.loss:.1f} FVU {r.fvu:.4f}")
    dens = r.density
    print(
        f"density median {float(dens.median()):.4f} p10 {float(dens.quantile(0.1)):.4f} p90 {float(dens.quantile(0.9)):.4f}"
    )
    for k in range(r.rank):
        print(f"--- f{k} density {float(r.density[k]):.4f} maxG {float(r.max_coef[k]):.3f}")
        print("  promotes:", r.logit_tokens(k, True, 8), " suppresses:", r.logit_tokens(k, False, 5))
        for j in range(3):
            toks, vals = r.context(k, j)
            print(
                f"  [{float(r.top_coefs[k, j]):.3f}] " + "".join(toks).replace("\n", "⏎"),
                "→",
                repr(r.top_token(k, j)),
            )
    sae = wb.run("train-sae", store=str(store.root), **SAE)
    print(f"sae {sae.cache_key} dictionary {sae.dictionary}")
    (OUT / "real_paths.json").write_text(
        json.dumps({"snmf": r.dictionary, "sae": sae.dictionary, "store": str(store.root)})
    )


def steer():
    paths = json.loads((OUT / "real_paths.json").read_text())
    s = wb.run("snmf-steering", snmf=paths["snmf"], dictionary=paths["sae"], model="smollm2-135m")
    print(f"snmf-steering {s.cache_key}")
    for row in s.summary():
        print(json.dumps(row, ensure_ascii=False))
    mean = s.mean_rise()
    print("mean rise over concepts (kind, sign: per target)", s.targets)
    for i, kind in enumerate(s.kinds):
        for j, sign in enumerate(s.signs):
            print(kind, sign, [round(float(v), 4) for v in mean[i, j]])
    print("mean AUROC", {k: round(float(s.auroc[:, i].mean()), 3) for i, k in enumerate(s.kinds)})
    print("reached", int(s.reached.sum()), "of", s.reached.numel())
    print("plain:", repr(s.plain_generation))
    for g in s.generations:
        print(json.dumps(g, ensure_ascii=False))


if __name__ == "__main__":
    {"fit": fit, "steer": steer, "all": lambda: (fit(), steer())}[sys.argv[1]]()
