"""The patching result: per-prompt scores of every method, baselines, agreement with AP and cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.analyses.patching.components import PER_HEAD, ComponentError
from workbench.analysis import Result

NAMES = {"ap": "AP", "atp": "AtP", "relp": "RelP", "ig": "IG"}
FEATURE_COLUMNS = ("feature_site", "feature_error", "top_latent")


@dataclass
class PatchingResult(Result):
    model: str
    task: str
    task_fingerprint: str
    prompts: list[str]
    skipped: list[list[Any]]
    metric: str
    direction: str
    methods: list[str]
    components: list[str]
    labels: list[str]
    """Token of each (end-aligned) position of the longest prompt."""
    n_layers: int
    n_heads: int
    baselines: dict[str, float]
    cost: dict[str, dict[str, float]]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    """'method/component' -> per-prompt scores [n_prompts, layer, pos] / [n_prompts, layer, head] / [.., head, pos]."""
    dictionary: str = ""
    """The dictionary whose latents were scored ('' = no feature attribution)."""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """feature_ids [kept] and per method m: 'm/latents' [prompt, kept], 'm/rest' (the other latents' sum),
    'm/error' (error node) and 'm/site' (the whole site's score), all per prompt: latents + rest + error = site."""
    feature_top: dict[str, list[dict]] = field(default_factory=dict)
    """method -> top latents by |task-mean score|: {latent, score, url} (url: the Feature explorer page)."""
    feature_hooks: list[str] = field(default_factory=list)
    """[input hook, splice hook] of the dictionary."""

    def map(self, method: str, component: str) -> torch.Tensor:
        """Mean over prompts: the task-level score map of one method and component."""
        key = f"{method}/{component}"
        if key not in self.scores:
            raise ComponentError(
                f"no scores for method '{method}' and component '{component}'; have {sorted(self.scores)}"
            )
        return self.scores[key].mean(0)

    def pearson(self) -> dict[str, dict[str, float]]:
        """Pearson r of each method's map with the AP map, per component type (over all cells)."""
        if "ap" not in self.methods:
            return {}
        return {
            m: {c: _pearson(self.map(m, c).flatten(), self.map("ap", c).flatten()) for c in self.components}
            for m in self.methods
            if m != "ap"
        }

    def per_prompt(
        self, method: str, component: str, layer: int, index: int, pos: int | None = None
    ) -> list[dict]:
        """Per-prompt scores of one cell: index = position (resid/attn/mlp) or head (heads, heads_pos + pos)."""
        scores = self.scores.get(f"{method}/{component}")
        if scores is None:
            raise ComponentError(
                f"unknown component '{component}' for method '{method}'; have {sorted(self.scores)}"
            )
        limit = scores.shape[2]
        what = "head" if component in PER_HEAD else "position"
        if not (0 <= layer < self.n_layers) or not (0 <= index < limit):
            raise ComponentError(
                f"unknown {component} cell: layer {layer}, {what} {index}; "
                f"layers 0..{self.n_layers - 1}, {what}s 0..{limit - 1}"
            )
        cell = scores[:, layer, index] if pos is None else scores[:, layer, index, pos]
        return [{"prompt": p, "score": float(v)} for p, v in zip(self.prompts, cell)]

    def top_heads(self, method: str = "ap", k: int = 10) -> list[dict]:
        if f"{method}/heads" not in self.scores:
            return []
        heads = self.map(method, "heads")
        order = heads.abs().flatten().argsort(descending=True)[:k]
        return [
            {
                "head": f"{int(i) // self.n_heads}.{int(i) % self.n_heads}",
                "score": round(float(heads.flatten()[i]), 4),
            }
            for i in order
        ]

    def summary(self) -> list[dict[str, Any]]:
        r = self.pearson()
        rows = []
        for m in self.methods:
            row = {"method": NAMES[m], "wall_s": round(self.cost[m]["wall_s"], 3)}
            row |= {k: self.cost[m][k] for k in ("forward", "backward")}
            row |= {f"r_{c}": round(r[m][c], 3) for c in self.components} if m in r else {}
            if self.feature_top:  # the same columns on every row: the CLI prints the first row's
                row |= self.feature_summary(m) or dict.fromkeys(FEATURE_COLUMNS)
            rows.append(row)
        return rows

    def feature_summary(self, method: str) -> dict[str, Any]:
        """Task-mean site score, error-node score and top latent of one method's feature attribution."""
        if f"{method}/site" not in self.features:
            return {}
        top = self.feature_top[method][0] if self.feature_top.get(method) else None
        return {
            "feature_site": round(float(self.features[f"{method}/site"].mean()), 4),
            "feature_error": round(float(self.features[f"{method}/error"].mean()), 4),
            "top_latent": top["latent"] if top else None,
        }

    def feature_table(self) -> list[dict[str, Any]]:
        """One row per (method, top latent) and each method's error node, with the dashboard link."""
        rows = []
        for m, top in self.feature_top.items():
            rows += [{"method": NAMES[m], **t, "latent": str(t["latent"])} for t in top]
            rows.append(
                {
                    "method": NAMES[m],
                    "latent": "error",
                    "score": float(self.features[f"{m}/error"].mean()),
                    "url": "",
                }
            )
        return rows

    def figures(self) -> dict[str, Any]:
        from workbench.analyses.patching import figures

        return figures.all_figures(self)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")
