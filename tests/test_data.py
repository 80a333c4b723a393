"""Text sources: document splitting, several sources in one stream, deterministic packing."""

import json

import pytest

from workbench.data import DataSourceError, fingerprint, iter_documents, pack


def test_text_documents_by_blank_lines_else_by_line(tmp_path):
    paragraphs = tmp_path / "paras.txt"
    paragraphs.write_text("first doc\nstill first\n\n  \nsecond doc\n")
    assert list(iter_documents(str(paragraphs))) == ["first doc\nstill first", "second doc"]
    # WikiText raw has no blank lines (and CRLF line ends): one document per line, not one per file
    lines = tmp_path / "wiki.raw"
    lines.write_bytes(b" = Title = \r\n Para one . \r\n Para two . \r\n")
    assert list(iter_documents(str(lines))) == ["= Title =", "Para one .", "Para two ."]


def test_several_sources_read_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.json"
    a.write_text("alpha\n\nbeta\n")
    b.write_text(json.dumps([{"story": "gamma"}, "delta"]))
    both = f"{a}, {b}"
    assert list(iter_documents(both)) == ["alpha", "beta", "gamma", "delta"]
    assert fingerprint(both) not in (fingerprint(str(a)), fingerprint(str(b)), fingerprint(f"{b},{a}"))
    with pytest.raises(DataSourceError, match="missing.txt"):
        list(iter_documents(f"{a},{tmp_path / 'missing.txt'}"))
    with pytest.raises(DataSourceError, match="empty"):
        fingerprint(" , ")


def test_pack_is_deterministic_and_keeps_document_ids(tiny_model, wikitext):
    first = [s for _, s in zip(range(20), pack(wikitext, tiny_model.tokenizer, 16))]
    again = [s for _, s in zip(range(20), pack(wikitext, tiny_model.tokenizer, 16))]
    assert first == again and all(len(s.tokens) == 16 == len(s.docs) for s in first)
    bos = tiny_model.tokenizer.bos_token_id
    assert all(s.tokens[0] == bos for s in first)
    docs = [d for s in first for d in s.docs[1:]]
    assert docs == sorted(docs) and docs[-1] > docs[0]  # many documents, in order


def test_unreadable_text_names_the_file_and_the_place(tmp_path):
    from workbench.data import check_source

    cases = {  # file -> (content, what follows the file name in the message)
        "bin.txt": (b"abc\x00def", ": binary file, not text (NUL byte at offset 3)"),
        "latin.txt": ("na\u00efve".encode("latin-1"), ": not UTF-8 text (byte 0xef at offset 2)"),
        "bad.jsonl": (b'{"text": "a"}\n{"text": 1}\n', " line 2: record has no text field"),
        "broken.jsonl": (b'{"text": "a"}\n{"text": "b"\n', " line 2: Expecting ',' delimiter (column 13)"),
        "bad.json": (b'[\n  "a",\n  "b" "c"\n]', " line 3: Expecting ',' delimiter (column 7)"),
        "notlist.json": (b'{"text": "a"}', ": expected a JSON list of strings or of objects with 'text'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataSourceError) as err:
            check_source(str(path))
        assert str(err.value).startswith(f"{path}{message}"), str(err.value)
    good = tmp_path / "ok.txt"
    good.write_bytes("\ufeffcaf\u00e9\n".encode())  # UTF-8 with a byte-order mark is fine
    check_source(str(good))
    assert list(iter_documents(str(good))) == ["caf\u00e9"]
