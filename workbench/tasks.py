"""Prompt-pair tasks: (clean prompt, corrupted prompt, answer, wrong answer), from files or templates.

A task is the input of every analysis that patches or attributes (activation patching, AtP, RelP,
integrated gradients). Sources, named by one spec string:

* `ioi` — IOI prompts from the templates below (ABBA and BABA name orders, several templates and
  names), `n` pairs drawn with `seed`. The corrupted prompt repeats the other name as the subject
  (the answers swap), as in the RelP demo (Jafari et al. 2025) and TransformerLens' AtP demo.
* `ioi-shared` / `ioi-shared-hard` — the shared EAP-IG IOI file (`ioi_llama.csv`); its token ids
  are for another tokenizer, so the answer strings are recovered from the prompts (the answer is
  the name that `corrupted_hard` puts where the clean prompt repeats the subject) and tokenized by
  the model's tokenizer. `ioi-shared` corrupts with a third name (ABC), `-hard` with the swap.
* a `.csv` or `.jsonl` file with the columns `clean, corrupted, answer, wrong`.

`tokenize` checks every pair (same token length for clean and corrupted, one-token answers) and
either raises one `TaskError` naming the first bad row or, with `skip_unusable`, reports each
skipped row with its reason. Pairs are grouped by token length so no padding is ever needed.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import paths


class TaskError(ValueError):
    """Bad task input (file, row, answer, length); the message names the row or option."""


SHARED_IOI = "ioi-prompts/ioi_llama.csv"
COLUMNS = ("clean", "corrupted", "answer", "wrong")
TEMPLATES = (  # {A} {B}: the first clause's names in order; {S}: the repeated subject
    "When{A} and{B} went to the {place},{S} gave the {obj} to",
    "When{A} and{B} got a {obj} at the {place},{S} decided to give it to",
    "Then,{A} and{B} were working at the {place}.{S} decided to give the {obj} to",
    "While{A} and{B} were walking to the {place},{S} handed the {obj} to",
)
NAMES = (" John", " Mary", " Tom", " James", " Dan", " Sarah", " Martin", " Amy", " Paul", " Anna")
NAMES += (" Mark", " Lisa", " David", " Emma", " Peter", " Kate", " Michael", " Laura", " Chris", " Jane")
PLACES = ("shops", "park", "school", "station", "office", "garden")
OBJECTS = ("bag", "book", "ring", "drink", "ball", "key")
TEMPLATE_VERSION = 1


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupted: str
    answer: str
    """The correct answer on the clean prompt (e.g. ' Mary', with its leading space)."""
    wrong: str
    """The competing answer (the corrupted prompt's answer in IOI)."""
    row: int
    """Where it came from: the data row number of a file (1 = first row after a CSV header), or the sample index."""


@dataclass
class Task:
    spec: str
    pairs: list[PromptPair]
    fingerprint: str
    source: str = ""


@dataclass
class Group:
    """Pairs of one token length, stacked: no padding anywhere."""

    index: list[int]  # position of each pair in TokenizedTask.pairs
    clean: torch.Tensor  # [batch, pos] token ids
    corrupted: torch.Tensor  # [batch, pos]
    answer: torch.Tensor  # [batch] token id of the correct answer
    wrong: torch.Tensor  # [batch]


@dataclass
class TokenizedTask:
    task: Task
    pairs: list[PromptPair]
    groups: list[Group]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # token strings of a longest clean prompt


def shared_root() -> Path:
    """The shared data folder (`$WORKBENCH_SHARED`, else `shared/` beside the checkout, else /work/shared)."""
    env = os.environ.get("WORKBENCH_SHARED")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2] / "shared"
    return beside if beside.exists() else Path("/work/shared")


def task_file(spec: str) -> Path | None:
    """The file a spec reads (None for template tasks)."""
    if spec in ("ioi-shared", "ioi-shared-hard"):
        return shared_root() / "data" / SHARED_IOI
    if spec == "ioi":
        return None
    return Path(spec).expanduser()


def fingerprint(spec: str) -> str:
    """Content identity of a task: sha256 of its file, or of the template set for built-in tasks."""
    path = task_file(spec)
    if path is None:
        templates = [TEMPLATE_VERSION, TEMPLATES, NAMES, PLACES, OBJECTS]
        return paths.sha256_json(templates)
    if not path.is_file():
        raise TaskError(
            f"task file {spec} does not exist (tasks: ioi, ioi-shared, ioi-shared-hard, or a .csv/.jsonl file)"
        )
    return paths.sha256_file(path)


def load_task(spec: str, n: int = 0, seed: int = 0) -> Task:
    """Every pair of a task file (`tokenize` takes the first `n` usable ones); templates draw `n` with `seed`."""
    if not spec or not spec.strip():
        raise TaskError("task is empty: give ioi, ioi-shared, ioi-shared-hard or a .csv/.jsonl file")
    if n < 0:
        raise TaskError(f"n_prompts must be >= 0, got {n}")
    fp = fingerprint(spec)
    path = task_file(spec)
    if path is None:
        pairs = ioi_templates(n or 8, seed)
    elif spec.startswith("ioi-shared"):
        pairs = _shared_ioi(path, hard=spec.endswith("hard"))
    else:
        pairs = _user_file(path)
    if not pairs:
        raise TaskError(f"task {spec} has no prompt pairs")
    return Task(spec, pairs, fp, str(path) if path else "templates")


def ioi_templates(n: int, seed: int = 0) -> list[PromptPair]:
    """`n` IOI pairs: alternating ABBA / BABA orders, templates cycled, names drawn with `seed`."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        io, s = rng.sample(NAMES, 2)
        first = (io, s) if i % 2 == 0 else (s, io)  # ABBA, then BABA
        fill = {"A": first[0], "B": first[1], "place": rng.choice(PLACES), "obj": rng.choice(OBJECTS)}
        template = TEMPLATES[(i // 2) % len(TEMPLATES)]
        clean, corrupted = template.format(S=s, **fill), template.format(S=io, **fill)
        pairs.append(PromptPair(clean, corrupted, io, s, i))
    return pairs


def _shared_ioi(path: Path, hard: bool) -> list[PromptPair]:
    rows = _read_csv(path, ("clean", "corrupted", "corrupted_hard"))
    pairs = []
    for row, r in rows:
        clean, hard_corr = r["clean"].split(" "), r["corrupted_hard"].split(" ")
        diff = [i for i, (a, b) in enumerate(zip(clean, hard_corr)) if a != b]
        if len(clean) != len(hard_corr) or len(diff) != 1:
            raise TaskError(
                f"{path} row {row}: clean and corrupted_hard differ in more than the subject name"
            )
        subject, answer = clean[diff[0]], hard_corr[diff[0]]
        corrupted = r["corrupted_hard"] if hard else r["corrupted"]
        pairs.append(PromptPair(r["clean"], corrupted, " " + answer, " " + subject, row))
    return pairs


def _user_file(path: Path) -> list[PromptPair]:
    if path.suffix == ".csv":
        rows = _read_csv(path, COLUMNS)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    else:
        raise TaskError(f"task file {path} must be .csv or .jsonl with columns {', '.join(COLUMNS)}")
    return [PromptPair(*(str(r[c]) for c in COLUMNS), row) for row, r in rows]


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise TaskError(
                    f"{path} has no column(s) {', '.join(missing)}; it needs {', '.join(columns)}"
                )
            return [(i, r) for i, r in enumerate(reader, 1)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TaskError(f"cannot read task file {path}: {err}") from err


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read task file {path}: {err}") from err
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as err:
            raise TaskError(f"{path} line {i}: not valid JSON ({err.msg})") from err
        missing = [c for c in COLUMNS if not isinstance(r, dict) or c not in r]
        if missing:
            raise TaskError(
                f"{path} line {i}: missing {', '.join(missing)}; each line needs {', '.join(COLUMNS)}"
            )
        rows.append((i, r))
    return rows


def tokenize(task: Task, model, skip_unusable: bool = False, limit: int = 0) -> TokenizedTask:
    """Token ids of the first `limit` usable pairs (0: all), grouped by length; unusable pairs
    before them raise or are listed with reasons."""
    usable: list[tuple[PromptPair, list[int], list[int], int, int]] = []
    skipped: list[tuple[int, str]] = []
    for pair in task.pairs:
        if limit and len(usable) == limit:
            break
        try:
            usable.append((pair, *_pair_ids(pair, model)))
        except TaskError as err:
            if not skip_unusable:
                raise TaskError(f"{str(err)} (skip_unusable=True skips such rows and lists them)") from err
            skipped.append((pair.row, str(err)))
    if not usable:
        raise TaskError(f"task {task.spec}: no usable prompt pairs ({len(skipped)} skipped: {skipped[0][1]})")
    by_len: dict[int, list[int]] = {}
    for i, (_, clean, *_rest) in enumerate(usable):
        by_len.setdefault(len(clean), []).append(i)
    groups = [
        Group(
            index=idx,
            clean=torch.tensor([usable[i][1] for i in idx]),
            corrupted=torch.tensor([usable[i][2] for i in idx]),
            answer=torch.tensor([usable[i][3] for i in idx]),
            wrong=torch.tensor([usable[i][4] for i in idx]),
        )
        for _, idx in sorted(by_len.items())
    ]
    # Positions are aligned at the end (the answer position) across lengths: label the longest.
    labels = [model.tokenizer.decode([t]) for t in groups[-1].clean[0].tolist()]
    return TokenizedTask(task, [u[0] for u in usable], groups, skipped, labels)


def _pair_ids(pair: PromptPair, model) -> tuple[list[int], list[int], int, int]:
    where = f"row {pair.row}"
    if not pair.clean.strip() or not pair.corrupted.strip():
        raise TaskError(f"{where}: empty prompt")
    clean = model.to_tokens(pair.clean)[0].tolist()
    corrupted = model.to_tokens(pair.corrupted)[0].tolist()
    if len(clean) != len(corrupted):
        raise TaskError(
            f"{where}: clean and corrupted prompts are {len(clean)} and {len(corrupted)} tokens; "
            "they must be the same length"
        )
    if len(clean) > model.cfg.n_ctx:
        raise TaskError(f"{where}: prompt is {len(clean)} tokens; the model takes at most {model.cfg.n_ctx}")
    answer, wrong = (
        _one_token(model, text, where, name)
        for text, name in ((pair.answer, "answer"), (pair.wrong, "wrong"))
    )
    if answer == wrong:
        raise TaskError(f"{where}: answer and wrong answer are the same token {pair.answer!r}")
    return clean, corrupted, answer, wrong


def _one_token(model, text: str, where: str, name: str) -> int:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise TaskError(
            f"{where}: {name} {text!r} is {len(ids)} tokens for this model's tokenizer; it must be one"
        )
    return ids[0]
