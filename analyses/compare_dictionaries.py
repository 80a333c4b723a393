"""Compare dictionaries: every SAE/transcoder trained on a site, L0 vs FVU vs CE recovered vs dead.

Reads what is already there, trains and evaluates nothing: the dictionary folders under
`$WORKBENCH_HOME/dictionaries` (their cfg.json: architecture, width, k, site) and the cached
results that scored them: the newest `sae-eval` row of each (FVU, L0, CE loss recovered, dead =
never fired on the evaluated tokens, and its split) and else the `train-sae` run that saved it
(its `final` scores on held-out rows; CE recovered is not measured there). Training options a
cfg.json does not keep (λ, training tokens) come from that `train-sae` run.

The sparsity–fidelity Pareto frontier (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", fig. 2; SAEBench, Karvonen et al. 2025) is the set of dictionaries that no other
dictionary of the same site beats on both L0 and FVU (lower is better on both): a dictionary off
the frontier is dominated, whatever its other merits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import paths, sites
from workbench.analysis import Result, register
from workbench.context import Context
from workbench.inputs import canonical_path, input_field, register_kind

HOME = "home"
"""The `dictionaries` value meaning $WORKBENCH_HOME/dictionaries (where train-sae saves)."""
ARCH_NAMES = {
    "standard": "ReLU SAE",
    "topk": "TopK SAE",
    "batchtopk": "BatchTopK SAE",
    "jumprelu": "JumpReLU SAE",
    "mp": "MP-SAE",
    "transcoder": "transcoder",
    "top_afa": "top-AFA SAE",
}
LAMBDA = {"standard": "l1_coefficient", "jumprelu": "l0_coefficient"}  # train-sae's λ per architecture
SPARSE_K = ("topk", "batchtopk", "mp", "transcoder")  # train-sae's k applies to these


def _folder(value: str) -> Path:
    return paths.home() / "dictionaries" if value in ("", HOME) else Path(canonical_path(value))


def _fingerprint(value: str) -> str:
    """What the comparison reads: each dictionary's cfg.json and weights (size, mtime) and the keys
    of the cached train-sae / sae-eval results, so a new dictionary or evaluation is a new key."""
    from workbench.cache import ResultsCache

    folder = _folder(value)
    seen = []
    for cfg in sorted(folder.glob("*/cfg.json")):
        weights = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in cfg.parent.glob("*.safetensors")
        )
        seen.append([cfg.parent.name, paths.sha256_file(cfg), weights])
    keys = sorted(r["key"] for name in ("train-sae", "sae-eval") for r in ResultsCache().list(analysis=name))
    return paths.sha256_json({"dictionaries": seen, "results": keys})


register_kind("dictionaries", _fingerprint, lambda v: str(_folder(v)))


@dataclass(frozen=True)
class CompareConfig:
    site: str = ""
    """Hook name the dictionaries read (an alias such as blocks.5.hook_out is accepted); empty = every site."""
    dictionaries: str = input_field("dictionaries", default=HOME)
    """Folder of dictionary folders; 'home' = $WORKBENCH_HOME/dictionaries (where train-sae saves)."""


def si(n: int | float | None) -> str:
    """1_000_000 -> '1M', 16384 -> '16.4k', 300 -> '300'."""
    if not n:
        return "?"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def readable_name(row: dict[str, Any]) -> str:
    """'TopK SAE · 4,608 latents · k=32 · 1M tokens · blocks.15.hook_resid_post', not a hash."""
    parts = [ARCH_NAMES.get(row["arch"], row["arch"]), f"{row['d_sae']:,} latents"]
    if row.get("k"):
        parts.append(f"k={row['k']}")
    if row.get("lam") is not None:
        parts.append(f"λ={row['lam']:g}")
    parts.append(f"{si(row.get('tokens'))} tokens")
    site = row["site"] if row.get("site_out") in (None, row["site"]) else f"{row['site']} → {row['site_out']}"
    return " · ".join([*parts, site])


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For each (l0, fvu): True when no other point is ≤ on both and < on one (lower is better)."""
    return [not any(a <= x and b <= y and (a < x or b < y) for a, b in points) for x, y in points]


def _results(name: str) -> list[dict]:
    """(config, result fields) of every cached `name` result, newest first; damaged ones skipped."""
    from workbench.cache import ResultsCache

    cache, out = ResultsCache(), []
    for row in cache.list(analysis=name):
        try:
            entry = cache.get(row["key"])
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed by its own analysis, not here
            continue
        if entry is not None:
            out.append({"key": row["key"], "config": entry.config, "fields": entry.result.get("fields", {})})
    return out


def _same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _describe(folder: Path, trained: list[dict], evals: list[dict]) -> dict[str, Any]:
    """One row: identity from cfg.json (+ the train-sae run that saved it), metrics from the newest
    sae-eval of it, else from that train-sae run's held-out `final`."""
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg.get("metadata") or {}
    run = next((t for t in trained if _same(t["fields"].get("dictionary", ""), str(folder))), None)
    tcfg = run["config"] if run else {}
    arch = (
        (run["fields"].get("arch") if run else None)
        or meta.get("training_architecture")
        or cfg.get("architecture", "standard")
    )
    site_in = meta.get("hook_name") or ""
    row: dict[str, Any] = {
        "path": str(folder),
        "arch": arch,
        "d_sae": int(cfg.get("d_sae") or 0),
        "k": cfg.get("k") or (tcfg.get("k") if arch in SPARSE_K else None),
        "lam": tcfg.get(LAMBDA[arch]) if arch in LAMBDA and tcfg else None,
        "tokens": run["fields"].get("tokens") if run else None,
        "site": sites.model_free_canonical(site_in),
        "site_out": sites.model_free_canonical(meta.get("hook_name_out") or site_in),
        "model": meta.get("model_name"),
    }
    found = next(
        (
            r
            for e in evals
            for r in e["fields"].get("table", [])
            if _same(r.get("dictionary", ""), str(folder))
        ),
        None,
    )
    if found:
        row |= {
            "l0": found.get("l0"),
            "fvu": found.get("fvu"),
            "ce_loss_score": found.get("ce_loss_score"),
            "frac_dead": found.get("frac_never_fired", found.get("frac_dead")),  # the name before 13.10
            "source": f"sae-eval ({found.get('split', '?')} rows)",
        }
    elif run and run["fields"].get("final"):
        final = run["fields"]["final"]
        row |= {
            "l0": final.get("l0"),
            "fvu": final.get("fvu"),
            "ce_loss_score": None,  # train-sae does not splice the model; run sae-eval for it
            "frac_dead": final.get("frac_never_fired"),
            "source": "train-sae (held_out rows)",
        }
    else:
        row |= {"l0": None, "fvu": None, "ce_loss_score": None, "frac_dead": None, "source": "not evaluated"}
    return row


COLUMNS = (
    "name",
    "arch",
    "d_sae",
    "k",
    "lam",
    "tokens",
    "site",
    "l0",
    "fvu",
    "ce_loss_score",
    "frac_dead",
    "pareto",
    "source",
    "path",
)


@dataclass
class CompareResult(Result):
    rows: list[dict]
    """One per dictionary: name (readable), arch, d_sae, k, lam (λ), tokens, site, site_out, model,
    l0, fvu, ce_loss_score (CE loss recovered), frac_dead, source (which result and split the
    numbers come from), pareto (on its site's L0-FVU frontier), path."""
    rule: str
    """The frontier's rule, stated."""

    def summary(self) -> list[dict]:
        return [{c: r.get(c) for c in COLUMNS} for r in self.rows]

    def figures(self) -> dict:
        import plotly.graph_objects as go

        scored = [r for r in self.rows if r["l0"] is not None and r["fvu"] is not None]
        fig = go.Figure(layout_title_text="L0 vs FVU (lower is better on both); line: Pareto frontier")
        for arch in dict.fromkeys(r["arch"] for r in scored):
            mine = [r for r in scored if r["arch"] == arch]
            fig.add_scatter(
                x=[r["l0"] for r in mine],
                y=[r["fvu"] for r in mine],
                mode="markers",
                name=ARCH_NAMES.get(arch, arch),
                text=[r["name"] for r in mine],
                customdata=[[r["ce_loss_score"], r["frac_dead"]] for r in mine],
                hovertemplate="%{text}<br>L0 %{x:.3g} · FVU %{y:.3g}<br>CE recovered %{customdata[0]:.3f} · "
                "dead %{customdata[1]:.1%}<extra></extra>",
                marker={"size": 11, "symbol": ["star" if r["pareto"] else "circle" for r in mine]},
            )
        for site in dict.fromkeys(r["site"] for r in scored):
            front = sorted((r for r in scored if r["pareto"] and r["site"] == site), key=lambda r: r["l0"])
            fig.add_scatter(
                x=[r["l0"] for r in front],
                y=[r["fvu"] for r in front],
                mode="lines",
                name=f"frontier · {site}",
                line={"dash": "dot"},
                hoverinfo="skip",
            )
        fig.update_layout(xaxis_title="L0 (active latents per token)", yaxis_title="FVU", xaxis_type="log")
        ce = [r for r in scored if r["ce_loss_score"] is not None]
        fig2 = go.Figure(layout_title_text="CE loss recovered vs L0 (higher is better)")
        fig2.add_scatter(
            x=[r["l0"] for r in ce],
            y=[r["ce_loss_score"] for r in ce],
            mode="markers",
            text=[r["name"] for r in ce],
            hovertemplate="%{text}<br>L0 %{x:.3g} · CE recovered %{y:.3f}<extra></extra>",
            marker={"size": 11},
        )
        fig2.update_layout(xaxis_title="L0", yaxis_title="CE loss recovered", xaxis_type="log")
        dead = [r for r in self.rows if r["frac_dead"] is not None]
        fig3 = go.Figure(layout_title_text="dead latents (never fired on the evaluated tokens)")
        fig3.add_bar(x=[r["frac_dead"] for r in dead], y=[r["name"] for r in dead], orientation="h")
        fig3.update_layout(xaxis_title="fraction of latents", xaxis_tickformat=".0%")
        return {"L0 vs FVU": fig, "CE recovered vs L0": fig2, "dead fraction": fig3}


RULE = (
    "Pareto frontier per site over L0 and FVU, lower is better on both: a dictionary is on it when no "
    "other dictionary of its site has L0 ≤ and FVU ≤ with one strictly lower"
)


def compare(folder: Path, site: str = "") -> list[dict]:
    """The comparison rows of every dictionary under `folder` (reading `site`, if given), with
    readable names, the frontier flag per site, sorted by site then L0."""
    trained, evals = _results("train-sae"), _results("sae-eval")
    rows = []
    for cfg in sorted(folder.glob("*/cfg.json")):
        try:
            rows.append(_describe(cfg.parent, trained, evals))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a readable dictionary folder: nothing to compare
    if site:
        wanted = sites.model_free_canonical(site)
        rows = [r for r in rows if wanted in (r["site"], r["site_out"])]
    names: dict[str, int] = {}
    for r in rows:
        r["name"] = readable_name(r)
        names[r["name"]] = names.get(r["name"], 0) + 1
    for r in rows:  # the same settings twice: the folder tells them apart
        if names[r["name"]] > 1:
            r["name"] += f" · {Path(r['path']).name[:8]}"
    for s in dict.fromkeys(r["site"] for r in rows):
        mine = [r for r in rows if r["site"] == s and r["l0"] is not None and r["fvu"] is not None]
        for r, on in zip(mine, pareto([(r["l0"], r["fvu"]) for r in mine])):
            r["pareto"] = on
    for r in rows:
        r.setdefault("pareto", False)
    return sorted(rows, key=lambda r: (r["site"], r["l0"] if r["l0"] is not None else float("inf")))


@register("compare-dictionaries", version=1)
def run(cfg: CompareConfig, ctx: Context) -> CompareResult:
    """Every dictionary on a site: L0, FVU, CE recovered, dead fraction, and the L0-FVU frontier."""
    folder = _folder(cfg.dictionaries)
    if not folder.is_dir():
        raise ValueError(f"no dictionaries folder at {folder}: train one with `workbench run train-sae`")
    rows = compare(folder, cfg.site)
    if not rows:
        where = f" reading {cfg.site}" if cfg.site else ""
        raise ValueError(f"no dictionaries{where} under {folder}: train one with `workbench run train-sae`")
    return CompareResult(rows=rows, rule=RULE)
