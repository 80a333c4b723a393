"""Prompt-pair tasks: sources, validation messages, fingerprints and cache keys; patching's bad input."""

import csv
import json
import threading

import pytest
import torch
from click.testing import CliRunner

from workbench import api, tasks
from workbench.context import POOL
from workbench.interventions import InterventionError, hooked


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "answer", "wrong"])
        w.writerows(rows)
    return str(path)


GOOD = [
    "When John and Mary went out, John gave it to",
    "When John and Mary went out, Mary gave it to",
    " Mary",
    " John",
]


def test_templates_are_seeded_balanced_and_swap_the_subject():
    a, b = tasks.ioi_templates(8, seed=1), tasks.ioi_templates(8, seed=1)
    assert a == b and a != tasks.ioi_templates(8, seed=2)
    for i, p in enumerate(a):
        assert p.clean.replace(p.wrong, "#").count("#") == 2  # subject twice in the clean prompt
        assert p.corrupted.count(p.answer) == 2 and p.answer != p.wrong
        first = p.clean.index(p.answer) < p.clean.index(p.wrong)
        assert first == (i % 2 == 0)  # ABBA then BABA
    assert len({p.clean.split(",")[0].split(" and")[0][:6] for p in a}) > 1  # several templates


def test_shared_ioi_answers_come_from_the_prompts(tiny_model):
    task = tasks.load_task("ioi-shared", 3)
    first = task.pairs[0]
    assert first.row == 1 and first.answer == " Amber" and first.wrong == " Aaron"
    assert "Tiffany" in first.corrupted
    assert tasks.load_task("ioi-shared-hard", 1).pairs[0].corrupted.count("Amber") == 2


def test_user_csv_and_jsonl_load_the_same_pairs(tmp_path):
    c = tasks.load_task(_write_csv(tmp_path / "t.csv", [GOOD, GOOD]))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(dict(zip(tasks.COLUMNS, GOOD))) for _ in range(2)))
    j = tasks.load_task(str(tmp_path / "t.jsonl"))
    assert [p.clean for p in c.pairs] == [p.clean for p in j.pairs] and c.pairs[1].row == 2


def test_bad_rows_name_the_row_or_are_listed(tmp_path, tiny_model):
    longer = [
        "When John and Mary went out, John gave it to",
        "When John and Mary went out, Johnathan Q gave it to",
    ]
    path = _write_csv(
        tmp_path / "t.csv", [GOOD, longer + [" Mary", " John"], GOOD[:2] + [" Mary Ann", " John"]]
    )
    task = tasks.load_task(path)
    with pytest.raises(tasks.TaskError) as err:
        tasks.tokenize(task, tiny_model)
    n_clean = len(tiny_model.to_tokens(longer[0])[0])
    n_corr = len(tiny_model.to_tokens(longer[1])[0])
    assert str(err.value) == (
        f"row 2: clean and corrupted prompts are {n_clean} and {n_corr} tokens; they must be the same length "
        "(skip_unusable=True skips such rows and lists them)"
    )
    tt = tasks.tokenize(task, tiny_model, skip_unusable=True)
    assert [p.row for p in tt.pairs] == [1]
    assert tt.skipped[1] == (
        3,
        "row 3: answer ' Mary Ann' is 2 tokens for this model's tokenizer; it must be one",
    )
    reordered = tasks.Task("t", task.pairs[1:] + task.pairs[:1], "")
    first = tasks.tokenize(reordered, tiny_model, skip_unusable=True, limit=1)
    assert [p.row for p in first.pairs] == [1] and [r for r, _ in first.skipped] == [2, 3]


def test_file_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"clean": "a"}\n')
    with pytest.raises(tasks.TaskError, match="bad.jsonl line 1: missing corrupted, answer, wrong"):
        tasks.load_task(str(tmp_path / "bad.jsonl"))
    (tmp_path / "cols.csv").write_text("clean,corrupted\nx,y\n")
    with pytest.raises(tasks.TaskError, match="has no column\\(s\\) answer, wrong"):
        tasks.load_task(str(tmp_path / "cols.csv"))
    (tmp_path / "empty.csv").write_text("clean,corrupted,answer,wrong\n")
    with pytest.raises(tasks.TaskError, match="empty.csv has no prompt pairs"):
        tasks.load_task(str(tmp_path / "empty.csv"))


def test_cache_key_follows_the_task_file_content(tmp_path, tiny_model_dir):
    path = _write_csv(tmp_path / "t.csv", [GOOD])
    key = api.key_for("patching", api.make_config("patching", task=path, model=str(tiny_model_dir)))
    same = api.key_for(
        "patching", api.make_config("patching", task=str(tmp_path / "." / "t.csv"), model=str(tiny_model_dir))
    )
    assert key == same  # one file, two spellings
    _write_csv(tmp_path / "t.csv", [GOOD, GOOD])
    edited = api.key_for("patching", api.make_config("patching", task=path, model=str(tiny_model_dir)))
    assert edited != key


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"components": "resid_pre,mlp_in"},
            "unknown component(s) ['mlp_in']; choose from resid_pre, attn_out, mlp_out, heads, heads_pos",
        ),
        ({"heads": "1.9"}, "unknown head 1.9: this model has layers 0..1 and heads 0..3"),
        ({"methods": "ap,eap"}, "unknown method(s) ['eap']; choose from ap, atp, relp, ig"),
        ({"task": " "}, "task is empty: give ioi, ioi-shared, ioi-shared-hard or a .csv/.jsonl file"),
        (
            {"task": "nope.csv"},
            "task file nope.csv does not exist (tasks: ioi, ioi-shared, ioi-shared-hard, or a .csv/.jsonl file)",
        ),
    ],
)
def test_cli_bad_input_is_one_line(options, message, tiny_model, tiny_model_dir):
    from workbench.cli import cli

    POOL.put(tiny_model)
    args = ["run", "patching", "--model", str(tiny_model_dir), "--n-prompts", "2"]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", v]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 2, out.output
    assert out.output.strip().splitlines()[-1] == f"error: {message}"


def test_a_model_without_gradients_is_refused(tiny_model, tiny_model_dir):
    POOL.put(tiny_model)
    with torch.inference_mode(), pytest.raises(ValueError) as err:
        api.run("patching", model=str(tiny_model_dir), n_prompts=2, methods="atp")
    assert str(err.value) == "the model is running under torch.inference_mode(): no gradients to attribute"


def test_hooks_are_scoped_to_the_block_and_the_thread(tiny_model):
    tokens = tiny_model.to_tokens("When John and Mary went out")
    with torch.no_grad():
        plain = tiny_model(tokens)
    zero = ("blocks.1.hook_mlp_out", lambda x, hook: torch.zeros_like(x))
    seen = {}
    with pytest.raises(RuntimeError), hooked(tiny_model, fwd=[zero]):
        with torch.no_grad():
            seen["ours"] = tiny_model(tokens)
        other = threading.Thread(target=lambda: seen.update(theirs=tiny_model(tokens).detach()))
        other.start()
        other.join()
        raise RuntimeError("fails inside the block")
    assert not torch.equal(seen["ours"], plain)  # the hook acted for this thread
    assert torch.equal(seen["theirs"], plain)  # another thread saw the plain model
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), plain)  # removed on the error
    with pytest.raises(InterventionError, match=r"unknown hook point\(s\) \['blocks.1.hook_mlp_outt'\]"):
        with hooked(tiny_model, fwd=[("blocks.1.hook_mlp_outt", zero[1])]):
            pass
