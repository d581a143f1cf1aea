"""`finetune data …` commands through typer's CliRunner: outputs, exit codes, no clobbering."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from finetune.cli_data import app

runner = CliRunner()


def conv(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture
def recipe(tmp_path, tokenizer_dir, write_recipe):
    data = {"train": [{"path": "builtin:tiny-chat"}], "chat_format": "mistral", "max_length": 20}
    return write_recipe(tmp_path / "r.yaml", tokenizer_dir, data)


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_validate_clean_and_bad(tmp_path, write_jsonl, recipe):
    good = write_jsonl(tmp_path / "good.jsonl", [conv("hi", "hello"), conv("a " * 40, "b")])
    code, out = run("validate", good)
    assert code == 0 and "2 records, 2 valid, 0 invalid" in out
    code, out = run("validate", good, "--recipe", recipe)
    assert code == 0 and f"{good}:2: " in out and "> max_length 20 (would be truncated)" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(conv("hi", "yo")) + "\n{oops\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
    )
    code, out = run("validate", bad, good)
    assert code == 2
    assert f"{bad}:2: invalid JSON" in out and f"{bad}:3: no assistant turn" in out
    assert "invalid JSON: 1" in out and "no assistant turn: 1" in out and "5 records, 3 valid, 2 invalid" in out


def test_missing_file_and_unknown_format_are_one_line_errors(tmp_path):
    code, out = run("validate", tmp_path / "nope.jsonl")
    assert code == 2 and "error: data file not found" in out and "Traceback" not in out
    code, out = run("validate", "builtin:tiny-chat", "--format", "yaml")
    assert code == 2 and "unknown format 'yaml'" in out


def test_convert_and_no_overwrite(tmp_path, write_jsonl):
    src = write_jsonl(
        tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    )
    out = tmp_path / "m.jsonl"
    code, text = run("convert", src, "--to", "messages", "-o", out)
    assert code == 0, text
    assert json.loads(out.read_text()) == conv("q", "a")
    code, text = run("convert", src, "--to", "messages", "-o", out)
    assert code == 2 and "--overwrite" in text
    code, text = run("convert", src, "--to", "messages", "-o", src, "--overwrite")
    assert code == 2 and "is one of the inputs" in text
    code, text = run("convert", src, "--to", "preference", "-o", tmp_path / "p.jsonl")
    assert code == 2 and "no chosen/rejected" in text
    pref = write_jsonl(
        tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}]
    )
    code, text = run("convert", pref, "--to", "preference", "-o", tmp_path / "p.jsonl")
    assert code == 0, text
    assert json.loads((tmp_path / "p.jsonl").read_text())["rejected"] == [{"role": "assistant", "content": "b"}]


def test_tokenize_preview_stats(tmp_path, write_jsonl, recipe, tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", [conv("What is 1 + 1?", "2"), conv("Say hi", "hi"), conv("Say hi", "hi")])
    out = tmp_path / "tok.jsonl"
    code, text = run("tokenize", src, "--recipe", recipe, "-o", out)
    assert code == 0, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{src}:{i}" for i in (1, 2, 3)]
    assert (
        tokenizer.decode([t for t, lab in zip(rows[0]["input_ids"], rows[0]["labels"], strict=True) if lab != -100])
        == "2</s>"
    )
    code, text = run("preview", src, "--recipe", recipe, "-n", "2")
    assert code == 0 and "What is 1 + 1?" in text and "trained" in text
    png = tmp_path / "len.png"
    code, text = run("stats", src, "--recipe", recipe, "--plot", png, "--json")
    assert code == 0, text
    stats = json.loads(text[: text.rindex("}") + 1])
    assert stats["records"] == 3 and stats["duplicates"] == 1 and stats["tokens_per_role"]["assistant"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_split_is_deterministic_and_order_independent(tmp_path, write_jsonl):
    rows = [conv(f"q{i}", f"a{i}") for i in range(200)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    b = write_jsonl(tmp_path / "b.jsonl", shuffled)
    for src, out in ((a, "oa"), (a, "oa2"), (b, "ob")):
        code, text = run("split", src, "--eval-fraction", "0.25", "--seed", "3", "-o", tmp_path / out)
        assert code == 0, text

    def part(out, name):
        return [json.loads(line) for line in (tmp_path / out / name).read_text().splitlines()]

    eval_a = part("oa", "eval.jsonl")
    assert 20 < len(eval_a) < 80 and len(eval_a) + len(part("oa", "train.jsonl")) == 200
    assert part("oa2", "eval.jsonl") == eval_a
    key = lambda r: r["messages"][0]["content"]  # noqa: E731
    assert sorted(map(key, part("ob", "eval.jsonl"))) == sorted(map(key, eval_a))
    code, _ = run("split", a, "--eval-fraction", "0.25", "--seed", "4", "-o", tmp_path / "oa")
    assert code == 2  # outputs exist


def test_dedupe_normalises_whitespace_and_case(tmp_path, write_jsonl):
    rows = [conv("Hello  world", "Hi"), conv("hello world", "hi "), conv("other", "x"), conv("HELLO\nWORLD", "HI")]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "dd.jsonl"
    code, text = run("dedupe", src, "-o", out)
    assert code == 0 and "2 duplicates removed" in text
    assert [json.loads(line) for line in out.read_text().splitlines()] == [rows[0], rows[2]]
    assert [json.loads(line) for line in src.read_text().splitlines()] == rows  # input untouched
