"""Text sources and token packing.

A source is a local `.txt` (documents separated by blank lines, else one per line), `.jsonl` (a
`text` field), `.json` (a list of strings or of objects with `text`/`story`), `.parquet` (a `text`
column), `hf:<dataset>[:<split>]` when online, or a comma-separated list of these, read in order.
Documents are tokenized without special tokens, joined with EOS and cut into fixed-length
sequences; with the `prepend` BOS policy each sequence starts with BOS. The packing is deterministic, which is what lets a killed capture resume by skipping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workbench import paths

# Package data (pyproject package-data), so the default source exists after a plain wheel install.
BUNDLED_TEXT = Path(__file__).resolve().parent / "resources" / "sample.txt"
BOS_POLICIES = ("prepend", "none")
TEXT_KEYS = ("text", "story", "content")
PACKING_VERSION = 2  # bump when the same text would pack into different sequences
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class DataSourceError(ValueError):
    """A text source that cannot be read; the message says why and what is accepted."""


def default_source() -> str:
    return str(BUNDLED_TEXT)


def fingerprint(source: str) -> str:
    """Content hash of the local files or names (+ split) of Hub datasets, and the packing version."""
    parts = [
        ["hf", p] if p.startswith("hf:") else paths.sha256_file(_local_path(p)) for p in split_sources(source)
    ]
    return paths.sha256_json([*parts, PACKING_VERSION])


def split_sources(source: str) -> list[str]:
    """A comma-separated list of sources is read in order, as one stream of documents."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    if not parts:
        raise DataSourceError("empty text source: pass a .txt/.jsonl/.json/.parquet file or hf:<dataset>")
    return parts


def _local_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataSourceError(
            f"text source '{source}' not found: pass a .txt/.jsonl/.json/.parquet file or hf:<dataset>"
        )
    return path


def iter_documents(source: str) -> Iterator[str]:
    for part in split_sources(source):
        yield from _documents_of(part)


def _documents_of(source: str) -> Iterator[str]:
    if source.startswith("hf:"):
        yield from _hf_documents(source[3:])
        return
    path = _local_path(source)
    kind = _kind_of(path)
    if kind == "text":
        yield from _text_documents(read_text(path))
    elif kind == "jsonl":
        yield from _jsonl_documents(path)
    elif kind == "json":
        yield from _json_documents(path)
    else:
        yield from (t for t in _parquet_column(path).to_pylist() if t)


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".md"):
        return "text"
    if suffix in (".jsonl", ".json", ".parquet"):
        return suffix[1:]
    raise DataSourceError(
        f"unsupported text source '{path}': use .txt, .jsonl, .json, .parquet or hf:<dataset>"
    )


def read_text(path: Path) -> str:
    """A file's text, strictly UTF-8: a binary or mis-encoded file says which byte and where."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataSourceError(f"{path}: binary file, not text (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield _text_of(json.loads(line))
        except ValueError as err:  # JSONDecodeError and a record without text
            raise DataSourceError(f"{path} line {lineno}: {_reason(err)}") from None


def _json_documents(path: Path) -> Iterator[str]:
    try:
        items = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path} line {err.lineno}: {err.msg} (column {err.colno})") from None
    if not isinstance(items, list):
        raise DataSourceError(f"{path}: expected a JSON list of strings or of objects with 'text'")
    for i, item in enumerate(items):
        try:
            yield _text_of(item)
        except ValueError as err:
            raise DataSourceError(f"{path} item {i}: {_reason(err)}") from None


def _reason(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} (column {err.colno})"
    return str(err)


def _parquet_column(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = next((k for k in TEXT_KEYS if k in table.column_names), None)
    if column is None:
        raise DataSourceError(f"{path} has no text column (looked for {TEXT_KEYS})")
    return table.column(column)


def check_source(source: str) -> None:
    """Read every local part once, before any model loads: existing, supported, UTF-8 text,
    well-formed JSON/JSONL records with text, a Parquet text column. Raises DataSourceError."""
    for part in split_sources(source):
        if not part.startswith("hf:"):
            for _ in _documents_of(part):
                pass


def _text_documents(text: str) -> Iterator[str]:
    """Blank-line separated documents; a file without blank lines (WikiText raw) has one per line."""
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.splitlines()
    return (p.strip() for p in parts if p.strip())


def _text_of(item) -> str:
    if isinstance(item, str):
        return item
    for key in TEXT_KEYS:
        if isinstance(item, dict) and isinstance(item.get(key), str):
            return item[key]
    raise DataSourceError(f"record has no text field (looked for {TEXT_KEYS}): {str(item)[:80]}")


def _hf_documents(spec: str) -> Iterator[str]:
    name, _, split = spec.partition(":")
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split or "train", streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many types when offline
        raise DataSourceError(f"cannot open Hugging Face dataset '{name}' (offline?): {err}") from err
    for row in dataset:
        yield _text_of(row)


@dataclass(frozen=True)
class Sequence:
    """One packed context window: token ids and the document each token came from."""

    tokens: list[int]
    docs: list[int]


def pack(source: str, tokenizer, ctx_len: int, bos: str = "prepend") -> Iterator[Sequence]:
    """Deterministic stream of `ctx_len`-token sequences over the source's documents."""
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos must be one of {BOS_POLICIES}, got '{bos}'")
    if ctx_len < 2:
        raise ValueError("ctx_len must be at least 2")
    body = ctx_len - (1 if bos == "prepend" else 0)
    sep = tokenizer.eos_token_id
    buf_tokens: list[int] = []
    buf_docs: list[int] = []
    for doc_id, text in enumerate(iter_documents(source)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if sep is not None:
            ids = ids + [sep]
        buf_tokens += ids
        buf_docs += [doc_id] * len(ids)
        n_full = len(buf_tokens) // body * body  # cut once per document: linear in its length
        for i in range(0, n_full, body):
            yield _sequence(buf_tokens[i : i + body], buf_docs[i : i + body], tokenizer, bos)
        del buf_tokens[:n_full], buf_docs[:n_full]


def _sequence(tokens: list[int], docs: list[int], tokenizer, bos: str) -> Sequence:
    if bos == "prepend":
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return Sequence([bos_id, *tokens], [docs[0], *docs])
    return Sequence(list(tokens), list(docs))
