"""Per-site activation statistics from an activation store.

For every captured site: mean, std, mean L2 norm per token, max |activation|, fraction of entries
> 0, excess kurtosis of the entry distribution (massive-activation / outlier-feature indicator,
cf. Sun et al. 2024), the fraction of signed dimensions, and per-dimension firing rate by the
workbench's firing rule (workbench.firing: a > 0 for non-negative units, |a| > 0.1 max|a| for
signed ones such as SwiGLU neurons, whose "> 0" rate is ~0.5 and means nothing), with dead (never
fire) and dense (fire on > 50% of tokens) fractions. Two streaming passes (range, then firing),
float64 accumulators, memory one shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.analysis import Result, register
from workbench.capture import CaptureConfig
from workbench.context import Context
from workbench.data import default_source
from workbench.firing import RULE as FIRING_RULE
from workbench.firing import fire_threshold, fires, is_signed
from workbench.inputs import captured, input_field
from workbench.models import DEFAULT_MODEL
from workbench.sites import layer_of
from workbench.store import ActivationStore


@dataclass(frozen=True)
class StatsConfig:
    store: str = input_field("store")
    """Path of an existing activation store; empty = capture one from the fields below."""
    model: str = captured(DEFAULT_MODEL, kind="model")
    """Model to capture from when no store is given."""
    sites: str = captured("blocks.*.mlp.hook_post,blocks.*.hook_resid_post")
    """Comma-separated hook names or globs to capture when no store is given."""
    data: str = captured(default_factory=default_source, kind="data")
    """Text source to capture from when no store is given."""
    n_tokens: int = captured(2048)
    """Token budget of the capture when no store is given."""
    ctx_len: int = captured(128)
    """Context length of the capture when no store is given."""
    fire_threshold: float = 0.0
    """0: the firing rule of workbench.firing (stated in the result); > 0: fires when a > this."""
    skip_bos: bool = True
    """Leave out position 0 (BOS; attention-sink tokens carry massive activations)."""

    def capture_config(self) -> CaptureConfig:
        return CaptureConfig(
            model=self.model,
            sites=self.sites,  # CaptureConfig splits it on commas outside {a,b}
            data=self.data,
            n_tokens=self.n_tokens,
            ctx_len=self.ctx_len,
        )


@dataclass
class StatsResult(Result):
    store: str
    n_tokens: int
    table: list[dict]
    """One row per site: layer, kind, mean, std, norm, max, frac_pos, kurtosis, dead/dense fractions."""
    firing_rate: dict[str, torch.Tensor]
    """site -> [d] fraction of tokens on which each dimension fires (firing_rule)."""
    firing_rule: str = FIRING_RULE
    """When a dimension fires."""

    def summary(self) -> list[dict]:
        return self.table

    def figures(self) -> dict:
        import plotly.express as px

        rows = [r for r in self.table if r["layer"] is not None]
        figs = {}
        for metric, title in (
            ("norm", "mean L2 norm per token"),
            ("frac_pos", "fraction of entries > 0"),
            ("kurtosis", "excess kurtosis"),
            ("dead_frac", "dead-dimension fraction"),
        ):
            fig = px.line(rows, x="layer", y=metric, color="kind", markers=True, title=f"{title} by layer")
            figs[f"{metric} by layer"] = fig
        if self.firing_rate:
            site = max(self.firing_rate, key=lambda s: (self.firing_rate[s].numel(), s))
            fig = px.histogram(
                x=self.firing_rate[site].tolist(),
                nbins=50,
                log_y=True,
                title=f"per-neuron firing rate, {site}",
                labels={"x": "firing rate"},
            )
            figs["firing-rate histogram"] = fig
        return figs


class _Moments:
    """Streaming float64 moments of all entries, per-dimension range, then per-dimension firing counts."""

    def __init__(self, d: int):
        self.n = 0
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.norm_sum = 0.0
        self.abs_max = 0.0
        self.positive = 0
        self.lo, self.hi = torch.full((d,), torch.inf), torch.full((d,), -torch.inf)
        self.fires = torch.zeros(d, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(len(x), -1).double()
        self.n += len(x)
        self.sums += torch.stack([x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum()])
        self.norm_sum += x.norm(dim=-1).sum().item()
        self.abs_max = max(self.abs_max, x.abs().max().item()) if x.numel() else self.abs_max
        self.positive += int((x > 0).sum())
        if len(x):
            self.lo = torch.minimum(self.lo, x.min(0).values.float())
            self.hi = torch.maximum(self.hi, x.max(0).values.float())

    def merge(self, part: _Moments) -> None:
        """Fold in one shard's moments; in shard order this is the same float arithmetic as
        adding the shard's rows here (0 + s is s), so a map-reduce run equals the local one."""
        self.n += part.n
        self.sums += part.sums
        self.norm_sum += part.norm_sum
        self.abs_max = max(self.abs_max, part.abs_max)
        self.positive += part.positive
        self.lo, self.hi = torch.minimum(self.lo, part.lo), torch.maximum(self.hi, part.hi)

    def threshold(self, fixed: float) -> torch.Tensor:
        """[d] threshold on |a| (firing rule), or the fixed threshold on a when fixed > 0."""
        if fixed > 0:
            return torch.full_like(self.lo, fixed)
        return fire_threshold(self.lo.clamp(max=0), self.hi.clamp(min=0))

    def count(self, x: torch.Tensor, t: torch.Tensor, fixed: float) -> None:
        x = x.reshape(len(x), -1).float()
        self.fires += (x > t if fixed > 0 else fires(x, t)).sum(0)

    def row(self) -> dict:
        count = self.n * len(self.fires)
        m1, m2, m3, m4 = (self.sums / count).tolist()
        var = max(m2 - m1**2, 1e-30)
        m4c = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4  # fourth central moment
        rate = self.fires / max(self.n, 1)
        return {
            "mean": m1,
            "std": var**0.5,
            "norm": self.norm_sum / max(self.n, 1),
            "max": self.abs_max,
            "frac_pos": self.positive / count,
            "kurtosis": m4c / var**2 - 3.0,
            "signed_frac": float(is_signed(self.lo).double().mean()),
            "dead_frac": float((rate == 0).double().mean()),
            "dense_frac": float((rate > 0.5).double().mean()),
        }


def site_kind(site: str) -> str:
    return site.split(".", 2)[2] if layer_of(site) is not None else site


def _shard(root: str, site: str, index: int, keep: torch.Tensor) -> torch.Tensor:
    """[kept rows, ...] of one shard. The store is opened once per process (a Ray worker's too)
    and again when its manifest changes (a repaired shard has a new checksum)."""
    manifest = os.stat(Path(root) / "manifest.parquet")
    key = (root, manifest.st_ino, manifest.st_mtime_ns)
    if key not in _STORES:
        _STORES.clear()
        _STORES[key] = ActivationStore(root)
    return _STORES[key].shard(site, index)[keep]


_STORES: dict[tuple, ActivationStore] = {}


def shard_moments(root: str, site: str, index: int, keep: torch.Tensor, d: int) -> _Moments:
    """Map step of pass 1: one shard's moments and per-dimension range."""
    part = _Moments(d)
    part.add(_shard(root, site, index, keep))
    return part


def shard_fires(
    root: str, site: str, index: int, keep: torch.Tensor, d: int, t: torch.Tensor, fixed: float
) -> torch.Tensor:
    """Map step of pass 2: [d] firing counts of one shard against the site's threshold."""
    part = _Moments(d)
    part.count(_shard(root, site, index, keep), t, fixed)
    return part.fires


@register("activation-stats", version=2)
def run(cfg: StatsConfig, ctx: Context) -> StatsResult:
    """Per-site activation statistics (mean, std, norm, max, fraction > 0, kurtosis, firing rates).
    Two passes of a per-shard map (`ctx.map`, here or on Ray) reduced in shard order."""
    store = ctx.store_or_capture(cfg.store, cfg.capture_config())
    keep = store.positions() != 0 if cfg.skip_bos else torch.ones(store.n_rows, dtype=torch.bool)
    table, firing = [], {}
    dims = {s: int(torch.tensor(store.shape(s)).prod()) for s in store.sites}
    moments = {s: _Moments(d) for s, d in dims.items()}
    root, needed = str(store.root), [("the store", str(store.root))]
    work = [
        (root, site, i, keep[rec.row_start : rec.row_end].clone(), dims[site])  # not a view of all rows
        for site in store.sites
        for i, rec in enumerate(store.records(site))
    ]
    # the map first in zip: its generator runs past its last item, so the last progress call lands
    for part, item in zip(ctx.map(shard_moments, work, "activation-stats: moments", needed, (0, 2)), work):
        moments[item[1]].merge(part)  # pass 1: moments and range
    t = {s: moments[s].threshold(cfg.fire_threshold) for s in store.sites}
    work = [(*item, t[item[1]], cfg.fire_threshold) for item in work]
    for counts, item in zip(ctx.map(shard_fires, work, "activation-stats: firing", needed, (1, 2)), work):
        moments[item[1]].fires += counts  # pass 2: firing, against the site's range
    for site in store.sites:
        row = moments[site].row()
        table.append({"site": site, "layer": layer_of(site), "kind": site_kind(site), **row})
        firing[site] = (moments[site].fires / max(moments[site].n, 1)).float()
    rule = FIRING_RULE if cfg.fire_threshold == 0 else f"a dimension fires when a > {cfg.fire_threshold:g}"
    return StatsResult(
        store=str(store.root), n_tokens=int(keep.sum()), table=table, firing_rate=firing, firing_rule=rule
    )
