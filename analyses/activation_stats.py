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

from dataclasses import dataclass

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


@register("activation-stats", version=2)
def run(cfg: StatsConfig, ctx: Context) -> StatsResult:
    """Per-site activation statistics (mean, std, norm, max, fraction > 0, kurtosis, firing rates)."""
    store = ctx.store_or_capture(cfg.store, cfg.capture_config())
    keep = store.positions() != 0 if cfg.skip_bos else torch.ones(store.n_rows, dtype=torch.bool)
    table, firing = [], {}
    work = [(site, i) for site in store.sites for i in range(store.n_shards(site))]
    moments = {s: _Moments(int(torch.tensor(store.shape(s)).prod())) for s in store.sites}
    thresholds: dict[str, torch.Tensor] = {}
    for step, (site, i) in ctx.progress(list(enumerate(work * 2)), desc="activation-stats"):
        rec = store.records(site)[i]
        x = store.shard(site, i)[keep[rec.row_start : rec.row_end]]
        if step < len(work):  # pass 1: moments and range
            moments[site].add(x)
            continue
        if site not in thresholds:  # pass 2: firing, against the site's range
            thresholds[site] = moments[site].threshold(cfg.fire_threshold)
        moments[site].count(x, thresholds[site], cfg.fire_threshold)
    for site in store.sites:
        row = moments[site].row()
        table.append({"site": site, "layer": layer_of(site), "kind": site_kind(site), **row})
        firing[site] = (moments[site].fires / max(moments[site].n, 1)).float()
    rule = FIRING_RULE if cfg.fire_threshold == 0 else f"a dimension fires when a > {cfg.fire_threshold:g}"
    return StatsResult(
        store=str(store.root), n_tokens=int(keep.sum()), table=table, firing_rate=firing, firing_rule=rule
    )
