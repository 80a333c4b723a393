"""A prefilled workbench home for tests, benchmarks and screenshots: one small activation store and
the cached results of every analysis that can run from it (through `workbench.api` only)."""

from __future__ import annotations

from typing import Any

from workbench import api

SITES = ("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post")


def prefill(model: str, n_tokens: int = 512, ctx_len: int = 32, data: str | None = None) -> dict[str, Any]:
    """Capture a store from `model` into $WORKBENCH_HOME and cache activation-stats (and neuron
    dashboards when that analysis exists) on it. Returns the store path and the cache keys."""
    cfg: dict[str, Any] = {"model": model, "sites": SITES, "n_tokens": n_tokens, "ctx_len": ctx_len}
    if data:
        cfg["data"] = data
    store = api.capture(progress=False, **cfg)
    out: dict[str, Any] = {"store": str(store.root), "keys": {}}
    out["keys"]["activation-stats"] = api.run("activation-stats", store=out["store"]).cache_key
    if "dashboards" in {a["name"] for a in api.list_analyses()}:
        site = "blocks.0.mlp.hook_post"
        out["keys"]["dashboards"] = api.run(
            "dashboards", store=out["store"], site=site, dictionary=""
        ).cache_key
    return out
