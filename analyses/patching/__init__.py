"""Activation patching, attribution patching (AtP), relevance patching (RelP) and integrated
gradients on one prompt-pair task, compared cell by cell.

* AP (ground truth): resid_pre / attn_out / mlp_out per layer x position, heads (all positions,
  or per position), denoising or noising, many patches per forward pass.
* AtP (Nanda 2023): (a_source - a_base) . dM/da on the base run, every component in 1 backward.
* RelP (Jafari, Eberle, Khakzar, Nanda 2025, arXiv 2508.21258): AtP through LRP backward rules.
* IG (EAP-IG style, Hanna et al. 2024): gradients averaged along the input-embedding path.
The result has per-prompt scores, Pearson r of each method with AP per component type, and the
cost (wall time, forward and backward passes) of each method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench import tasks
from workbench.analyses.patching.components import COMPONENTS, ComponentError, parse_components, parse_heads
from workbench.analyses.patching.compute import DIRECTIONS, METHODS, Options, run_task
from workbench.analyses.patching.features import FEATURE_METHODS, FeatureAttributionError
from workbench.analyses.patching.metrics import METRICS
from workbench.analyses.patching.result import PatchingResult
from workbench.analysis import register
from workbench.context import Context
from workbench.inputs import canonical_path, input_field, register_kind
from workbench.models import DEFAULT_MODEL, PROCESSING_MODES

__all__ = ["PatchingConfig", "PatchingResult", "run"]
RELP_RULES = ("norm", "identity", "half")


def _task_canonical(spec: str) -> str:
    return spec if tasks.task_file(spec) is None or spec.startswith("ioi-shared") else canonical_path(spec)


register_kind("task", tasks.fingerprint, _task_canonical)


@dataclass(frozen=True)
class PatchingConfig:
    task: str = input_field("task", "ioi")
    """Prompt pairs: ioi (templates), ioi-shared / ioi-shared-hard (shared EAP-IG file), or a .csv/.jsonl with columns clean,corrupted,answer,wrong."""
    model: str = input_field("model", DEFAULT_MODEL)
    """Model key, local folder or Hub id."""
    processing: str = "raw"
    """Weight processing: raw (HF numerics) or compat (folded norms, as TransformerLens)."""
    n_prompts: int = 8
    """Pairs used: the first n usable pairs of a file (0 = all), or n drawn from the templates (0 = 8)."""
    seed: int = 0
    """Seed of the template draw (names, places, objects)."""
    skip_unusable: bool = False
    """Skip (and list) pairs that cannot be used instead of stopping at the first one."""
    metric: str = "normalized"
    """normalized (M = (LD - LD_corr)/(LD_clean - LD_corr)), logit_diff, prob (answer probability) or kl (KL to clean)."""
    direction: str = "denoise"
    """denoise: patch clean activations into the corrupted run; noise: corrupted into the clean run."""
    methods: str = "ap,atp,relp,ig"
    """Comma-separated: ap (activation patching), atp, relp, ig."""
    components: str = "resid_pre,attn_out,mlp_out,heads"
    """Comma-separated: resid_pre, attn_out, mlp_out (per layer x position), heads (all positions), heads_pos."""
    heads: str = "all"
    """Heads patched and scored: all, or layer.head pairs such as 9.6,10.0."""
    ig_steps: int = 8
    """Points on the integrated-gradients path (forward + backward passes of IG)."""
    relp_rules: str = "norm,identity,half"
    """LRP rules of RelP: any of norm, identity, half."""
    relp_ah: bool = False
    """Also the AH rule in RelP (attention pattern constant in the backward)."""
    max_batch_tokens: int = 4096
    """Most tokens per forward pass of the AP sweep and of IG (patches x prompts x positions)."""
    dictionary: str = input_field("dictionary", "")
    """SAE/transcoder folder (ours or SAELens') or release/id: also attribute the metric to its latents (AtP/RelP)."""
    feature_top_k: int = 20
    """Top latents (by |task-mean score|) listed per feature-attribution method."""

    def __post_init__(self):
        checks = [
            (self.metric in METRICS, f"metric must be one of {', '.join(METRICS)}, got '{self.metric}'"),
            (
                self.direction in DIRECTIONS,
                f"direction must be one of {', '.join(DIRECTIONS)}, got '{self.direction}'",
            ),
            (
                self.processing in PROCESSING_MODES,
                f"processing must be one of {', '.join(PROCESSING_MODES)}, got '{self.processing}'",
            ),
            (self.ig_steps >= 1, f"ig_steps must be >= 1, got {self.ig_steps}"),
            (self.max_batch_tokens >= 1, f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}"),
            (self.n_prompts >= 0, f"n_prompts must be >= 0, got {self.n_prompts}"),
            (self.feature_top_k >= 1, f"feature_top_k must be >= 1, got {self.feature_top_k}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.method_list()
        parse_components(self.components)
        bad = [r for r in _split(self.relp_rules) if r not in RELP_RULES]
        if bad:
            raise ValueError(f"unknown relp_rules {bad}; choose from {', '.join(RELP_RULES)}")
        if not self.task.strip():
            raise tasks.TaskError(
                "task is empty: give ioi, ioi-shared, ioi-shared-hard or a .csv/.jsonl file"
            )
        tasks.fingerprint(self.task)  # a missing task file fails here, before any model loads
        if self.dictionary:
            self.feature_methods()
            _check_folder(self.dictionary)

    def method_list(self) -> tuple[str, ...]:
        methods = tuple(dict.fromkeys(_split(self.methods)))
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"unknown method(s) {bad or [self.methods]}; choose from {', '.join(METHODS)}")
        return methods

    def feature_methods(self) -> tuple[str, ...]:
        """The selected methods that also score the dictionary's latents (AtP, RelP)."""
        picked = tuple(m for m in self.method_list() if m in FEATURE_METHODS)
        if not picked:
            raise FeatureAttributionError(
                f"dictionary feature attribution needs method atp or relp; methods are {self.methods}"
            )
        return picked


def _check_folder(spec: str) -> None:
    """A local path that exists but is not a dictionary folder fails here (missing ones at load)."""
    path = Path(spec).expanduser()
    if path.exists() and not (path / "cfg.json").exists():
        raise FeatureAttributionError(
            f"dictionary {spec} holds no cfg.json; it is not a SAELens dictionary folder"
        )


def _load_dictionary(spec: str):
    from workbench.sae.io import DictionaryError, load_dictionary

    try:
        return load_dictionary(spec)
    except DictionaryError as err:  # a user error (one line, exit 2), before the model loads
        raise FeatureAttributionError(f"cannot load dictionary: {err}") from err


def _split(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


@register("patching", version=2)
def run(cfg: PatchingConfig, ctx: Context) -> PatchingResult:
    """Activation patching vs AtP vs RelP vs integrated gradients on a prompt-pair task (IOI by default)."""
    task = tasks.load_task(cfg.task, cfg.n_prompts, cfg.seed)  # file errors before the model loads
    sae = _load_dictionary(cfg.dictionary) if cfg.dictionary else None
    model = ctx.model(cfg.model, cfg.processing)
    if sae is not None:  # model, processing and width, before any patching pass
        from workbench.sae.compat import check_model

        check_model(sae, model, cfg.dictionary)
    components = parse_components(cfg.components)
    heads = parse_heads(cfg.heads, model.cfg.n_layers, model.cfg.n_heads)
    tt = tasks.tokenize(task, model, cfg.skip_unusable, limit=cfg.n_prompts)
    n_pos = max(g.clean.shape[1] for g in tt.groups)
    opt = Options(
        components=components,
        methods=cfg.method_list(),
        heads=heads,
        metric=cfg.metric,
        direction=cfg.direction,
        ig_steps=cfg.ig_steps,
        relp_rules=tuple(_split(cfg.relp_rules)),
        relp_ah=cfg.relp_ah,
        max_rows=max(1, cfg.max_batch_tokens // n_pos),
    )
    units = iter(ctx.progress(range(len(tt.groups) * len(opt.methods)), desc="patching"))
    out = run_task(model, tt, opt, step=lambda _m: next(units, None))
    for _ in units:  # close the bar
        pass
    extra = _features(model, tt, sae, cfg) if sae is not None else {}
    return PatchingResult(
        model=cfg.model,
        task=cfg.task,
        task_fingerprint=task.fingerprint,
        prompts=[p.clean for p in tt.pairs],
        skipped=[list(s) for s in tt.skipped],
        metric=cfg.metric,
        direction=cfg.direction,
        methods=list(opt.methods),
        components=list(components),
        labels=tt.labels,
        n_layers=model.cfg.n_layers,
        n_heads=model.cfg.n_heads,
        baselines=out.baselines,
        cost=out.cost,
        scores=out.scores,
        dictionary=canonical_path(cfg.dictionary) if cfg.dictionary else "",
        **extra,
    )


def _features(model, tt, sae, cfg: PatchingConfig) -> dict:
    """Feature attribution by each selected AtP/RelP method, with the run's metric, direction and rules."""
    from workbench.analyses.patching.features import feature_attribution, pack

    sae = sae.to(next(model.parameters()).device)
    name = canonical_path(cfg.dictionary)
    scores = {
        m: feature_attribution(
            model,
            tt,
            sae,
            cfg.metric,
            m,
            direction=cfg.direction,
            rules=tuple(_split(cfg.relp_rules)),
            ah=cfg.relp_ah,
            dictionary=name,
        )
        for m in cfg.feature_methods()
    }
    return pack(scores, cfg.feature_top_k)


__all__ += ["COMPONENTS", "ComponentError"]
