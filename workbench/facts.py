"""Fact sets for factual-recall tracing: (subject, prompt, attribute) rows, tokenized and checked.

Sources, named by one spec string:

* `known` — ROME's `known_1000.json` (Meng et al. 2022; 1209 rows) from the shared data folder.
* `relations` — templated relations this project writes: capital of a country, official
  language of a country, home country of a company (`RELATIONS`).
* `relations-cf` — the same facts, each preceded by two in-context demonstrations of the same
  relation with *counterfactual* attributes ("The capital of Japan is Madrid. ..."), as in
  Lv et al. 2024; the traced attribute stays the true (in-weights) one.
* a `.json` (a list of objects), `.jsonl` or `.csv` file with the fields subject, prompt, attribute.

`prepare` tokenizes every fact, locates the subject's token span in its prompt (an error naming
the row when the subject is not there) and takes the attribute's first token as the target.
`split_known` keeps the facts whose greedy next token is that target (ROME's filter).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import paths
from workbench.tasks import shared_root

FIELDS = ("subject", "prompt", "attribute")
KNOWN = "rome-known-1000/known_1000.json"
BUILTIN = ("known", "relations", "relations-cf")
TEMPLATE_VERSION = 1
RELATIONS = {  # relation -> (template, [(subject, attribute)])
    "capital": (
        "The capital of {} is",
        [
            ("France", "Paris"),
            ("Germany", "Berlin"),
            ("Japan", "Tokyo"),
            ("Italy", "Rome"),
            ("Spain", "Madrid"),
            ("Russia", "Moscow"),
            ("China", "Beijing"),
            ("Egypt", "Cairo"),
            ("Greece", "Athens"),
            ("Austria", "Vienna"),
            ("Poland", "Warsaw"),
            ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"),
            ("Norway", "Oslo"),
            ("Thailand", "Bangkok"),
        ],
    ),  # fmt: skip
    "language": (
        "The official language of {} is",
        [
            ("France", "French"),
            ("Germany", "German"),
            ("Spain", "Spanish"),
            ("Italy", "Italian"),
            ("Japan", "Japanese"),
            ("Russia", "Russian"),
            ("Portugal", "Portuguese"),
            ("Greece", "Greek"),
            ("Turkey", "Turkish"),
            ("Poland", "Polish"),
        ],
    ),  # fmt: skip
    "company": (
        "{} is a company from the country of",
        [
            ("Toyota", "Japan"),
            ("Volkswagen", "Germany"),
            ("Ferrari", "Italy"),
            ("Renault", "France"),
            ("Nokia", "Finland"),
            ("IKEA", "Sweden"),
            ("Samsung", "Korea"),
            ("Boeing", "America"),
        ],
    ),  # fmt: skip
}


class FactError(ValueError):
    """Bad fact input (file, row, subject, attribute); the message names the row or option."""


@dataclass(frozen=True)
class Fact:
    subject: str
    prompt: str
    attribute: str
    row: int
    """Where it came from: 1-based row of a file (line of a .jsonl), or the index of a built-in fact."""


@dataclass
class FactSet:
    spec: str
    facts: list[Fact]
    fingerprint: str


@dataclass
class Prepared:
    """One tokenized fact: token ids [pos] (with the model's BOS), subject span [start, end), target id."""

    fact: Fact
    tokens: torch.Tensor
    start: int
    end: int
    target: int
    labels: list[str] = field(default_factory=list)


def fact_file(spec: str) -> Path | None:
    """The file a spec reads (None for the templated relations)."""
    if spec == "known":
        return shared_root() / "data" / KNOWN
    if spec in ("relations", "relations-cf"):
        return None
    return Path(spec).expanduser()


def fingerprint(spec: str) -> str:
    """Content identity: sha256 of the fact file, or of the relation tables for templated sets."""
    path = fact_file(spec)
    if path is None:
        return paths.sha256_json([TEMPLATE_VERSION, spec, RELATIONS])
    if not path.is_file():
        raise FactError(
            f"fact file {spec} does not exist (facts: {', '.join(BUILTIN)}, or a .json/.jsonl/.csv file)"
        )
    return paths.sha256_file(path)


def canonical(spec: str) -> str:
    return spec if spec in BUILTIN else str(Path(spec).expanduser().resolve())


def load_facts(spec: str) -> FactSet:
    """Every fact of a source (rows are checked for the three fields here, tokens in `prepare`)."""
    if not spec or not spec.strip():
        raise FactError(f"facts is empty: give {', '.join(BUILTIN)} or a .json/.jsonl/.csv file")
    fp = fingerprint(spec)
    if spec in ("relations", "relations-cf"):
        facts = relation_facts(counterfactual=spec.endswith("cf"))
    else:
        facts = _read(fact_file(spec))
    if not facts:
        raise FactError(f"fact file {spec} holds no facts")
    return FactSet(spec, facts, fp)


def relation_facts(counterfactual: bool = False) -> list[Fact]:
    """The templated relations; with `counterfactual`, two demonstrations with wrong attributes first."""
    facts = []
    for template, pairs in RELATIONS.values():
        for i, (subject, attribute) in enumerate(pairs):
            prompt = template.format(subject)
            if counterfactual:  # demo subjects i+1, i+2 get the attributes of i+2, i+3: never their own
                n = len(pairs)
                demos = [
                    f"{template.format(pairs[(i + k) % n][0])} {pairs[(i + k + 1) % n][1]}." for k in (1, 2)
                ]
                prompt = " ".join(demos + [prompt])
            facts.append(Fact(subject, prompt, attribute, len(facts)))
    return facts


def _read(path: Path) -> list[Fact]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FactError(f"cannot read fact file {path}: {err}") from err
    if path.suffix == ".csv":
        try:
            rows = list(enumerate(csv.DictReader(text.splitlines()), 1))
        except csv.Error as err:
            raise FactError(f"cannot read fact file {path}: {err}") from err
    elif path.suffix == ".jsonl":
        rows = [
            (i, _json(line, path, f"line {i}")) for i, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    elif path.suffix == ".json":
        data = _json(text, path, "")
        if not isinstance(data, list):
            raise FactError(f"{path}: a .json fact file must hold a list of objects with {', '.join(FIELDS)}")
        rows = list(enumerate(data, 1))
    else:
        raise FactError(f"fact file {path} must be .json, .jsonl or .csv with fields {', '.join(FIELDS)}")
    facts = []
    for i, r in rows:
        missing = [c for c in FIELDS if not isinstance(r, dict) or not isinstance(r.get(c), str)]
        if missing:
            raise FactError(
                f"{path} row {i}: missing {', '.join(missing)}; each row needs {', '.join(FIELDS)}"
            )
        facts.append(Fact(r["subject"], r["prompt"], r["attribute"], i))
    return facts


def _json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise FactError(f"{path}{' ' + where if where else ''}: not valid JSON ({err})") from err


# --- tokens ---------------------------------------------------------------------------------
def prepare(fact: Fact, model) -> Prepared:
    """Token ids, subject token span and target token of one fact; FactError naming its row."""
    where = f"row {fact.row}"
    if not fact.prompt.strip():
        raise FactError(f"{where}: empty prompt")
    ids = model.to_tokens(fact.prompt)[0]
    if len(ids) > model.cfg.n_ctx:
        raise FactError(f"{where}: prompt is {len(ids)} tokens; the model takes at most {model.cfg.n_ctx}")
    labels = [model.tokenizer.decode([t]) for t in ids.tolist()]
    start, end = subject_span(labels, fact.subject, where, fact.prompt)
    target = attribute_token(model, fact.attribute, where)
    return Prepared(fact, ids, start, end, target, labels)


def subject_span(labels: list[str], subject: str, where: str = "", prompt: str = "") -> tuple[int, int]:
    """[start, end) of the tokens covering the first occurrence of `subject` in the decoded tokens."""
    text = "".join(labels)
    at = text.find(subject) if subject.strip() else -1
    if at < 0:
        raise FactError(f"{where}: subject {subject!r} is not in its prompt {prompt!r}")
    ends = [0]
    for piece in labels:
        ends.append(ends[-1] + len(piece))  # ends[i + 1]: character end of token i
    start = max(i for i in range(len(labels)) if ends[i] <= at)
    end = min(i + 1 for i in range(len(labels)) if ends[i + 1] >= at + len(subject))
    return start, end


def attribute_token(model, attribute: str, where: str = "") -> int:
    """First token of the attribute as it follows the prompt (a leading space is added if missing)."""
    text = attribute if attribute[:1].isspace() else " " + attribute
    ids = model.tokenizer.encode(text, add_special_tokens=False) if attribute.strip() else []
    if not ids:
        raise FactError(f"{where}: attribute {attribute!r} tokenizes to nothing")
    return ids[0]


@torch.no_grad()
def greedy_next(model, prepared: list[Prepared]) -> list[int]:
    """The model's top-1 next token after each prompt (one forward per prompt length)."""
    out = [0] * len(prepared)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prepared):
        by_len.setdefault(len(p.tokens), []).append(i)
    for idx in by_len.values():
        logits = model(torch.stack([prepared[i].tokens for i in idx]), return_type="logits")[:, -1]
        for i, t in zip(idx, logits.argmax(-1).tolist()):
            out[i] = t
    return out


def split_known(model, prepared: list[Prepared]) -> tuple[list[Prepared], list[Prepared]]:
    """(known, unknown): a fact is known when the greedy next token is its attribute's first token."""
    top = greedy_next(model, prepared)
    known = [p for p, t in zip(prepared, top) if t == p.target]
    unknown = [p for p, t in zip(prepared, top) if t != p.target]
    return known, unknown


def typed_file(subject: str, prompt: str, attribute: str) -> str:
    """A one-fact .jsonl file in the workbench home for a fact typed in the app (named by its content,
    so the same fact is the same cached run); returns its path."""
    line = json.dumps({"subject": subject, "prompt": prompt, "attribute": attribute}) + "\n"
    path = paths.home() / "facts" / f"typed-{paths.sha256_json(line)[:16]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.atomic_write_bytes(path, line.encode())
    return str(path)
