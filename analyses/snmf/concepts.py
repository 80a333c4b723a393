"""Concept prompt sets for the steering comparison, and the two scores it reports.

The sets are the project's own (workbench/resources/concepts/): per concept 20 positive sentences
and 15 concept words, one shared pool of 24 neutral sentences, and 10 open steering prompts. A
user file (.json with `name`, `positive`, `tokens`, optionally `neutral`) works the same way.

* Concept detection AUROC (`auroc`): P(score of a concept sentence > score of a neutral sentence),
  ties counting ½ (Mann–Whitney U / (n_pos · n_neg)), on held-out sentences.
* Concept-token probability (`concept_prob`): the summed next-token probability of the concept's
  token ids after the last token of each prompt, averaged over prompts. The token ids are the first
  token of " word" and of " Word" for each concept word (SentencePiece/BPE models mark a word start
  with the space).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

BUILTIN = ("food", "weather", "sports", "music", "animals")


class ConceptError(ValueError):
    """A concept set that cannot be read (unknown name, missing fields); one readable line."""


@dataclass(frozen=True)
class Concept:
    name: str
    positive: tuple[str, ...]
    neutral: tuple[str, ...]
    words: tuple[str, ...]


def _builtin(name: str) -> dict:
    return json.loads(
        resources.files("workbench.resources").joinpath("concepts").joinpath(f"{name}.json").read_text()
    )


def load_concepts(spec: str) -> list[Concept]:
    """'all', or comma-separated built-in names and .json paths."""
    names = (
        list(BUILTIN) if spec.strip() in ("", "all") else [s.strip() for s in spec.split(",") if s.strip()]
    )
    neutral = tuple(_builtin("neutral")["neutral"])
    out = []
    for name in names:
        if name in BUILTIN:
            data = _builtin(name)
        elif name.endswith(".json") and Path(name).expanduser().is_file():
            data = json.loads(Path(name).expanduser().read_text())
        else:
            raise ConceptError(
                f"unknown concept '{name}': use {', '.join(BUILTIN)}, 'all', or a .json file with "
                "name, positive and tokens"
            )
        missing = [
            k for k in ("positive", "tokens") if len(data.get(k) or []) < (4 if k == "positive" else 1)
        ]
        if missing:
            raise ConceptError(f"concept '{name}' needs at least 4 'positive' sentences and 1 'tokens' word")
        out.append(
            Concept(
                data.get("name", name),
                tuple(data["positive"]),
                tuple(data.get("neutral") or neutral),
                tuple(data["tokens"]),
            )
        )
    return out


def load_prompts() -> list[str]:
    return list(_builtin("prompts")["prompts"])


def token_ids(tokenizer, words) -> list[int]:
    """Distinct first token ids of ' word' and ' Word' for each word."""
    ids = []
    for w in words:
        for form in (f" {w}", f" {w[:1].upper()}{w[1:]}"):
            t = tokenizer.encode(form, add_special_tokens=False)
            if t:
                ids.append(int(t[0]))
    return sorted(set(ids))


def split(sentences: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(train, held-out): even-indexed sentences select and fit the direction, odd ones score it."""
    return list(sentences[0::2]), list(sentences[1::2])


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """AUROC of scores pos [n_pos, ...] vs neg [n_neg, ...] (per trailing column), ties count ½."""
    p, n = pos.double()[:, None], neg.double()[None, :]
    return ((p > n).double() + 0.5 * (p == n).double()).mean((0, 1)).float()


def concept_prob(log_probs: torch.Tensor, last: torch.Tensor, ids: list[int]) -> float:
    """Mean over prompts of Σ_{t ∈ ids} p(t) at each prompt's last real position; log_probs [batch, pos, vocab]."""
    at_last = log_probs[torch.arange(len(last)), last]  # [batch, vocab]
    return float(at_last[:, ids].exp().sum(-1).mean())
