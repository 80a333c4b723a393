"""Steering comparison at matched KL: an SNMF feature vs an SAE latent vs difference-in-means.

Shafran, Geiger, Geva 2025 (arXiv 2506.10920) steer with α·F[:,k]/‖F[:,k]‖ at mlp.hook_post at every
position, with α searched so that KL(plain ‖ steered) hits {0.025 … 0.5} in both signs, and compare
against SAE latents and DiffMeans. Here, per concept (analyses/snmf/concepts.py), three directions:

* **snmf**: the SNMF feature whose coefficient G (mean over a sentence's tokens, BOS excluded) best
  separates the concept's training sentences from neutral ones (highest AUROC), steered along F[:,k];
* **sae**: the same selection among the latents of a dictionary (optional), steered along its W_dec row
  at the dictionary's own site;
* **diffmeans**: mean activation over the concept's training-sentence tokens minus the neutral mean,
  at the SNMF site; its reading is the projection onto the unit direction.

Training sentences (even-indexed) select and fit; held-out (odd-indexed) give the detection AUROC.
Steering: α calibrated per (direction, sign, target) on the open prompts (workbench.steering, KL over
every position); the score is the rise of the concept's own tokens' probability after each prompt's
last token, steered minus plain, averaged over prompts (concepts.concept_prob). No LLM judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from workbench import steering
from workbench.analyses.snmf import concepts as cs
from workbench.analyses.snmf.steering_result import KINDS, SteeringResult
from workbench.analysis import register
from workbench.context import Context
from workbench.inputs import input_field
from workbench.interventions import hooked


@dataclass(frozen=True)
class SteeringConfig:
    snmf: str = input_field("dictionary")
    """SNMF dictionary folder (the `dictionary` of a `workbench run snmf` result)."""
    dictionary: str = input_field("dictionary")
    """SAE dictionary to compare (e.g. from `workbench run train-sae` on the same store); empty = no SAE row."""
    model: str = input_field("model")
    """Model; empty = the SNMF dictionary's model (and weight processing)."""
    concepts: str = "all"
    """Concepts: all, or comma-separated names (food, weather, sports, music, animals) or .json files."""
    targets: str = "0.025,0.05,0.1,0.15,0.25,0.35,0.5"
    """Target KL values (the paper's), comma-separated."""
    signs: Literal["both", "plus", "minus"] = "both"
    """Steering signs: +α (towards the feature), −α, or both."""
    n_new: int = 16
    """Tokens generated for the plain vs steered examples (greedy)."""
    generate_kl: float = 0.25
    """Target KL of the example generations (+ sign; 0 = no generations)."""

    def __post_init__(self):
        parse_targets(self.targets)  # readable error at config time, before any load
        if self.generate_kl < 0:
            raise ValueError(f"generate_kl must be >= 0, got {self.generate_kl}")


def parse_targets(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"targets must be comma-separated numbers, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"targets must be KL values > 0, got '{text}'")
    return values


@torch.no_grad()
def sentence_acts(model, sentences: list[str], sites: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per site, per sentence: its token activations [n_tokens, d] (BOS and padding dropped)."""
    batch = steering.tokenize(model, sentences)
    seen: dict[str, torch.Tensor] = {}

    def keep(site):
        def hook(x, hook):
            seen[site] = x.detach().float().reshape(*x.shape[:2], -1).cpu()

        return hook

    with hooked(model, fwd=[(s, keep(s)) for s in dict.fromkeys(sites)]):
        model(batch.tokens)
    mask = batch.mask.cpu()
    return {s: [seen[s][i, 1 : int(mask[i].sum())] for i in range(len(sentences))] for s in sites}


def readings(reader, acts: list[torch.Tensor]) -> torch.Tensor:
    """[n_sentences, units]: each unit's mean reading over a sentence's tokens."""
    return torch.stack([reader(a).float().mean(0) for a in acts])


def pick(reader, pos: list[torch.Tensor], neg: list[torch.Tensor]) -> tuple[int, float]:
    """The unit with the highest training AUROC (ties: larger mean difference) and that AUROC."""
    rp, rn = readings(reader, pos), readings(reader, neg)
    au = cs.auroc(rp, rn)
    gap = rp.mean(0) - rn.mean(0)
    best = int(torch.argmax(au + 1e-6 * gap / (gap.abs().max() + 1e-12)))
    return best, float(au[best])


def directions_for(concept, model, snmf, sae, site: str, sae_site: str) -> list[dict]:
    """The three directions of a concept: kind, unit, site, vector, held-out AUROC."""
    pos_train, pos_test = cs.split(concept.positive)
    neg_train, neg_test = cs.split(concept.neutral)
    sites = [site] + ([sae_site] if sae is not None else [])
    tr = {k: sentence_acts(model, s, sites) for k, s in (("pos", pos_train), ("neg", neg_train))}
    te = {k: sentence_acts(model, s, sites) for k, s in (("pos", pos_test), ("neg", neg_test))}
    out = []
    k, _ = pick(snmf.encode, tr["pos"][site], tr["neg"][site])
    out.append({"kind": "snmf", "unit": k, "site": site, "vector": snmf.W_dec[k].detach().float()})
    if sae is not None:
        j, _ = pick(sae.encode, tr["pos"][sae_site], tr["neg"][sae_site])
        out.append({"kind": "sae", "unit": j, "site": sae_site, "vector": sae.W_dec[j].detach().float()})
    mean = lambda acts: torch.cat(acts).mean(0)  # noqa: E731 - token-level class means
    v = mean(tr["pos"][site]) - mean(tr["neg"][site])
    out.append({"kind": "diffmeans", "unit": -1, "site": site, "vector": v})
    readers = {
        "snmf": lambda a: snmf.encode(a)[:, k : k + 1],
        "sae": lambda a: sae.encode(a)[:, out[1]["unit"] : out[1]["unit"] + 1],
        "diffmeans": lambda a: (a @ (v / v.norm()))[:, None],
    }
    for d in out:
        s = d["site"]
        d["auroc"] = float(
            cs.auroc(readings(readers[d["kind"]], te["pos"][s]), readings(readers[d["kind"]], te["neg"][s]))[
                0
            ]
        )
    return out


def steer(model, batch, d: dict, ids: list[int], targets: list[float], signs: list[int]):
    """α, KL, reached and concept-probability rise per (sign, target) for one direction, and its KL curve."""
    curve = steering.KLCurve(model, batch, d["vector"], d["site"])
    plain = cs.concept_prob(curve.plain, batch.last, ids)
    shape = (len(signs), len(targets))
    out = {k: torch.zeros(shape) for k in ("alpha", "kl", "reached", "rise")}
    for i, sign in enumerate(signs):
        for j, t in enumerate(targets):
            cal = steering.calibrate_on(curve, t, sign)
            out["alpha"][i, j], out["kl"][i, j], out["reached"][i, j] = cal.alpha, cal.kl, float(cal.ok)
            out["rise"][i, j] = cs.concept_prob(cal.log_probs, batch.last, ids) - plain
    out["plain"] = torch.tensor(plain)
    return out, curve


def _load(cfg: SteeringConfig, ctx: Context):
    from workbench.analyses.sae_eval import dictionary_sites
    from workbench.sae.compat import check_model
    from workbench.sae.io import load_dictionary

    snmf = load_dictionary(cfg.snmf)
    if snmf.cfg.architecture() != "snmf":
        raise ValueError(f"--snmf {cfg.snmf} is a '{snmf.cfg.architecture()}' dictionary, not an SNMF fit")
    sae = load_dictionary(cfg.dictionary) if cfg.dictionary else None
    record = snmf.cfg.metadata.get("workbench") or {}
    model = ctx.model(cfg.model or record.get("model", ""), record.get("processing", "raw"))
    check_model(snmf, model, cfg.snmf)
    if sae is not None:
        check_model(sae, model, cfg.dictionary)
    return model, snmf, sae, dictionary_sites(snmf)[0], dictionary_sites(sae)[0] if sae is not None else ""


@register("snmf-steering", version=1)
def run(cfg: SteeringConfig, ctx: Context) -> SteeringResult:
    """Steering at matched KL: SNMF feature vs SAE latent vs difference-in-means, per concept."""
    if not cfg.snmf:
        raise ValueError(
            "snmf-steering needs --snmf (the dictionary folder of a `workbench run snmf` result)"
        )
    concepts = cs.load_concepts(cfg.concepts)  # file errors before the model loads
    targets = parse_targets(cfg.targets)
    signs = {"both": [1, -1], "plus": [1], "minus": [-1]}[cfg.signs]
    model, snmf, sae, site, sae_site = _load(cfg, ctx)
    prompts = cs.load_prompts()
    batch = steering.tokenize(model, prompts)
    kinds = [k for k in KINDS if sae is not None or k != "sae"]
    table = {
        k: torch.full((len(concepts), len(kinds), len(signs), len(targets)), torch.nan)
        for k in ("alpha", "kl", "reached", "rise")
    }
    auroc, units, plain, generations = (
        torch.zeros(len(concepts), len(kinds)),
        [],
        torch.zeros(len(concepts)),
        [],
    )
    for c, concept in enumerate(ctx.progress(concepts, desc="snmf-steering: concepts")):
        ids = cs.token_ids(model.tokenizer, concept.words)
        dirs = directions_for(concept, model, snmf, sae, site, sae_site)
        units.append([d["unit"] for d in dirs])
        for i, d in enumerate(dirs):
            auroc[c, i] = d["auroc"]
            res, curve = steer(model, batch, d, ids, targets, signs)
            for key in table:
                table[key][c, i] = res[key]
            plain[c] = res["plain"]
            if cfg.generate_kl > 0:
                generations.append(example(model, prompts[0], d, concept.name, curve, cfg))
    return SteeringResult(
        concepts=[c.name for c in concepts],
        kinds=kinds,
        targets=targets,
        signs=signs,
        units=units,
        site=site,
        sae_site=sae_site,
        snmf=cfg.snmf,
        dictionary=cfg.dictionary,
        generations=generations,
        plain_generation=steering.generate(model, prompts[0], cfg.n_new) if cfg.generate_kl > 0 else "",
        prompts=prompts,
        plain_prob=plain,
        auroc=auroc,
        **table,
    )


def example(model, prompt: str, d: dict, concept: str, curve, cfg: SteeringConfig) -> dict:
    """Plain and steered greedy continuations of `prompt` at +α calibrated to generate_kl."""
    cal = steering.calibrate_on(curve, cfg.generate_kl, 1)
    return {
        "concept": concept,
        "kind": d["kind"],
        "unit": d["unit"],
        "alpha": cal.alpha,
        "kl": cal.kl,
        "prompt": prompt,
        "reached": cal.ok,
        "steered": steering.generate(model, prompt, cfg.n_new, d["site"], d["vector"], cal.alpha),
    }
