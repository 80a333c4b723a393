"""The factual-recall result: per-fact traces, AIE by token type, DLA, mover heads, suppression."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.analyses.factual.aggregate import TOKEN_TYPES
from workbench.analyses.factual.tracing import KINDS, SEVER
from workbench.analysis import Result

TRACE_NAMES = list(KINDS) + [f"hidden, {s} severed" for s in SEVER]
NOT_TRACED = -1.0  # a P(attribute) cell that was not computed (P itself is in [0, 1])
EARLY, LATE = 0.6, 0.4  # the early site peaks in the first 60 % of layers, the late site in the last 60 %


def _pad(maps: list[torch.Tensor], n_pos: int, fill: float) -> torch.Tensor:
    """Stack [..., pos_i] maps into [fact, ..., n_pos]: `fill` past each fact's last token and for NaN
    (untraced) cells. Stored tensors hold no NaN: a cached result compares equal to its loaded copy."""
    out = torch.full((len(maps), *maps[0].shape[:-1], n_pos), fill)
    for i, m in enumerate(maps):
        out[i, ..., : m.shape[-1]] = m.float().cpu().nan_to_num(fill)
    return out


@dataclass
class FactualResult(Result):
    model: str
    facts: str
    facts_fingerprint: str
    rows: list[dict]
    """Each traced fact: row, subject, prompt, attribute, start/end (subject token span), labels (tokens)."""
    unknown: list[dict]
    """Facts checked but not known (greedy next token is not the attribute's first token): skipped."""
    n_checked: int
    noise: float
    sigma: float
    samples: int
    window: int
    n_layers: int
    n_heads: int
    traces: torch.Tensor
    """[fact, kind, layer, pos] P(attribute) with one state restored; kinds TRACE_NAMES; NOT_TRACED (-1)
    past a prompt's end and at positions not traced."""
    p_clean: torch.Tensor
    p_corrupted: torch.Tensor
    aie: torch.Tensor
    """[kind, token type, layer] mean indirect effect over facts (TOKEN_TYPES)."""
    aie_ci: torch.Tensor
    """[kind, token type, layer] 95 % CI half-width (0 with fewer than 2 facts)."""
    aie_n: torch.Tensor
    """[kind, token type, layer] facts averaged (0: no fact has that token type; its AIE reads 0)."""
    mech: dict[str, torch.Tensor] = field(default_factory=dict)
    """heads/path/subject_attn [fact, layer, head]; mlp_last/attn_last [fact, layer]; mlp_pos/attn_pos
    [fact, layer, pos]; embed_last/rest [fact]; suppression [fact, 2] (P clean, P with suppressors removed)."""
    regression: dict = field(default_factory=dict)
    suppressors: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        cfg,
        model,
        chosen,
        unknown,
        checked,
        fingerprint,
        window,
        sigma,
        maps,
        p_clean,
        p_corrupted,
        mech,
        aggregate,
    ):
        n_pos = max(len(p.tokens) for p in chosen)
        p_corr = torch.tensor(p_corrupted)
        mean = ci = traces = count = torch.zeros(0)  # tracing off
        if maps:
            ie = [m - pc for m, pc in zip(maps, p_corr.tolist())]
            per_type = torch.stack([aggregate.by_type(e, p.start, p.end) for e, p in zip(ie, chosen)])
            mean, ci = (v.nan_to_num(0.0) for v in aggregate.aie(per_type))
            count = (~per_type.isnan()).sum(0)
            traces = _pad(maps, n_pos, NOT_TRACED)
        arrays = {}
        if mech:
            arrays = {k: v for k, v in mech.items() if isinstance(v, torch.Tensor)}
            arrays["mlp_pos"], arrays["attn_pos"] = (
                _pad(mech["mlp_pos"], n_pos, 0.0),
                _pad(mech["attn_pos"], n_pos, 0.0),
            )
        return cls(
            model=cfg.model,
            facts=cfg.facts,
            facts_fingerprint=fingerprint,
            rows=[_row(p) for p in chosen],
            unknown=[
                {"row": p.fact.row, "prompt": p.fact.prompt, "attribute": p.fact.attribute} for p in unknown
            ],
            n_checked=checked,
            noise=cfg.noise,
            sigma=sigma,
            samples=cfg.samples,
            window=window,
            n_layers=model.cfg.n_layers,
            n_heads=model.cfg.n_heads,
            traces=traces,
            p_clean=torch.tensor(p_clean),
            p_corrupted=p_corr,
            aie=mean,
            aie_ci=ci,
            aie_n=count,
            mech=arrays,
            regression=mech.get("regression", {}) if mech else {},
            suppressors=mech.get("suppressors", {}) if mech else {},
        )

    # --- reading -----------------------------------------------------------------------------
    def known_fraction(self) -> float:
        return (self.n_checked - len(self.unknown)) / self.n_checked if self.n_checked else float("nan")

    def ate(self) -> float:
        """Average total effect P_clean - P_corrupted over the traced facts."""
        return float((self.p_clean - self.p_corrupted).mean()) if self.p_corrupted.numel() else float("nan")

    def peak(self, kind: str, token_type: str) -> dict[str, float]:
        """Layer, AIE and 95 % CI of the largest AIE of one kind at one token type."""
        if not self.aie.numel():
            return {"layer": -1, "aie": float("nan"), "ci": float("nan")}
        k, t = TRACE_NAMES.index(kind), TOKEN_TYPES.index(token_type)
        have = self.aie_n[k, t] > 0
        if not have.any():
            return {"layer": -1, "aie": float("nan"), "ci": float("nan")}
        layer = int(self.aie[k, t].masked_fill(~have, -math.inf).argmax())
        return {"layer": layer, "aie": float(self.aie[k, t, layer]), "ci": float(self.aie_ci[k, t, layer])}

    def sites(self) -> dict[str, dict]:
        """Early site: MLP at the last subject token peaks in the first 60 % of layers with a CI above 0.
        Late site: attention at the last token peaks in the last 60 % of layers with a CI above 0."""
        top = self.n_layers - 1
        early, late = self.peak("mlp", "last subject"), self.peak("attn", "last token")
        return {
            "early": {**early, "present": _above(early) and early["layer"] <= EARLY * top},
            "late": {**late, "present": _above(late) and late["layer"] >= LATE * top},
        }

    def top_movers(self, k: int = 10) -> list[dict]:
        """Heads whose mean-ablation (path patching) lowers the attribute logit most."""
        if "path" not in self.mech:
            return []
        effect = self.mech["path"].mean(0).flatten()
        attn = self.mech["subject_attn"].mean(0).flatten()
        return [
            {"head": f"{int(i) // self.n_heads}.{int(i) % self.n_heads}", "effect": round(float(effect[i]), 4),
             "attn_to_subject": round(float(attn[i]), 3)}
            for i in effect.argsort()[:k]
        ]  # fmt: skip

    def top_dla_heads(self, k: int = 10) -> list[dict]:
        if "heads" not in self.mech:
            return []
        dla = self.mech["heads"].mean(0).flatten()
        return [
            {"head": f"{int(i) // self.n_heads}.{int(i) % self.n_heads}", "dla": round(float(dla[i]), 4)}
            for i in dla.abs().argsort(descending=True)[:k]
        ]

    def suppression_table(self) -> list[dict]:
        """Per fact: P(attribute) clean and with the final layer's suppressors removed, and the gain."""
        if "suppression" not in self.mech:
            return []
        return [
            {"row": r["row"], "prompt": r["prompt"], "attribute": r["attribute"], "p": round(float(a), 4),
             "p_without_suppressors": round(float(b), 4), "gain": round(float(b - a), 4)}
            for r, (a, b) in zip(self.rows, self.mech["suppression"].tolist())
        ]  # fmt: skip

    def summary(self) -> list[dict[str, Any]]:
        if not self.traces.numel():
            return self.top_dla_heads()
        rows = []
        for kind in TRACE_NAMES[: len(self.traces[0])]:
            row = {"state": kind}
            for t in ("last subject", "last token"):
                pk = self.peak(kind, t)
                row[f"peak AIE {t}"] = round(pk["aie"], 4)
                row[f"layer ({t})"] = pk["layer"]
            rows.append(row)
        return rows

    def fact_figure(self, i: int):
        """Heat-maps token x layer of fact i's traces (hidden, MLP, attention[, severed])."""
        from workbench.analyses.factual import figures

        return figures.fact_traces(self, i)

    def figures(self) -> dict[str, Any]:
        from workbench.analyses.factual import figures

        return figures.all_figures(self)


def _above(peak: dict) -> bool:
    return peak["aie"] - (0 if math.isnan(peak["ci"]) else peak["ci"]) > 0


def _row(p) -> dict:
    f = p.fact
    return {"row": f.row, "subject": f.subject, "prompt": f.prompt, "attribute": f.attribute,
            "start": p.start, "end": p.end, "labels": p.labels}  # fmt: skip
