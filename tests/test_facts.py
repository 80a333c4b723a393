"""Fact sets: sources, subject-span location, attribute tokens, and one readable line per bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from workbench import api
from workbench import facts as F
from workbench.cli import cli


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_known_1000_and_relations_load():
    known = F.load_facts("known")
    assert len(known.facts) == 1209 and known.facts[0].subject == "Vinson Massif"
    cf = F.load_facts("relations-cf").facts
    plain = F.load_facts("relations").facts
    assert [f.attribute for f in cf] == [f.attribute for f in plain]
    for fact, base in zip(cf, plain):
        assert fact.prompt.endswith(base.prompt) and fact.prompt != base.prompt
        demos = fact.prompt[: -len(base.prompt)]
        assert f" {fact.attribute}." not in demos  # counterfactual demos never show the fact's answer
    assert F.fingerprint("relations") != F.fingerprint("relations-cf")


def test_subject_span_covers_the_subject_tokens(tiny_model):
    p = F.prepare(F.Fact("Eiffel Tower", "The Eiffel Tower is in the city of", "Paris", 7), tiny_model)
    assert "".join(p.labels[p.start : p.end]).strip() == "Eiffel Tower"
    assert (
        p.labels[0] == "<|endoftext|>"
        and p.target == tiny_model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    )
    first = F.prepare(F.Fact("Vinson Massif", "Vinson Massif is located in", "Antarctica", 1), tiny_model)
    assert first.start == 1 and "".join(first.labels[1 : first.end]) == "Vinson Massif"
    assert F.subject_span(["a", " bc", "de", " f"], "cd") == (1, 3)  # a subject cut inside tokens


@pytest.mark.parametrize(
    "fact, message",
    [
        (
            F.Fact("Rome", "The capital of France is", "Paris", 4),
            "row 4: subject 'Rome' is not in its prompt 'The capital of France is'",
        ),
        (F.Fact("France", "The capital of France is", "  ", 2), "row 2: attribute '  ' tokenizes to nothing"),
        (F.Fact("France", "The capital of France is", "", 3), "row 3: attribute '' tokenizes to nothing"),
        (F.Fact("France", "   ", "Paris", 5), "row 5: empty prompt"),
    ],
)
def test_bad_facts_name_their_row(tiny_model, fact, message):
    with pytest.raises(F.FactError) as err:
        F.prepare(fact, tiny_model)
    assert str(err.value) == message


def test_bad_files_give_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = {
        str(empty): f"fact file {empty} holds no facts",
        str(tmp_path / "nope.json"): "fact file .*nope.json does not exist",
    }
    for spec, message in cases.items():
        with pytest.raises(F.FactError, match=message):
            F.load_facts(spec)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"subject": "a", "prompt": "a b", "attribute": "c"}\n{"subject": "a",\n')
    with pytest.raises(F.FactError, match=r"broken.jsonl line 2: not valid JSON"):
        F.load_facts(str(broken))
    missing = _write(tmp_path / "missing.jsonl", [{"subject": "a", "prompt": "a b"}])
    with pytest.raises(F.FactError) as err:
        F.load_facts(missing)
    assert str(err.value) == f"{missing} row 1: missing attribute; each row needs subject, prompt, attribute"
    (tmp_path / "obj.json").write_text('{"subject": "a"}')
    with pytest.raises(F.FactError, match="must hold a list of objects"):
        F.load_facts(str(tmp_path / "obj.json"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(F.FactError, match=r"must be \.json, \.jsonl or \.csv"):
        F.load_facts(str(tmp_path / "f.txt"))


def test_csv_and_json_files_read_the_same_facts(tmp_path):
    rows = [{"subject": "France", "prompt": "The capital of France is", "attribute": "Paris"}]
    (tmp_path / "f.csv").write_text("subject,prompt,attribute\nFrance,The capital of France is,Paris\n")
    (tmp_path / "f.json").write_text(json.dumps(rows))
    got = [F.load_facts(str(tmp_path / n)).facts for n in ("f.csv", "f.json")]
    assert got[0] == got[1] == [F.Fact("France", "The capital of France is", "Paris", 1)]


def test_config_errors_before_any_model_loads(tmp_path):
    with pytest.raises(F.FactError) as err:
        api.make_config("factual", noise=0)
    assert str(err.value) == "noise must be > 0 (a multiple of the subject embeddings' std), got 0"
    with pytest.raises(F.FactError, match="noise must be > 0"):
        api.make_config("factual", noise=-1.5)
    with pytest.raises(F.FactError, match="fact file .*nope.jsonl does not exist"):
        api.make_config("factual", facts=str(tmp_path / "nope.jsonl"))


def test_cli_prints_one_error_line(tmp_path):
    out = CliRunner().invoke(cli, ["run", "factual", "--noise", "0", "--model", "no-such-model"])
    assert out.exit_code == 2
    assert "error: noise must be > 0 (a multiple of the subject embeddings' std), got 0.0" in out.output
    assert "Traceback" not in out.output


def test_fact_file_key_follows_content_and_not_spelling(tmp_path):
    path = _write(tmp_path / "f.jsonl", [{"subject": "a", "prompt": "a b", "attribute": "c"}])
    a = api.key_for("factual", api.make_config("factual", facts=path))
    b = api.key_for("factual", api.make_config("factual", facts=str(tmp_path / "." / "f.jsonl")))
    assert a == b
    _write(tmp_path / "f.jsonl", [{"subject": "a", "prompt": "a b", "attribute": "d"}])
    assert api.key_for("factual", api.make_config("factual", facts=path)) != a
