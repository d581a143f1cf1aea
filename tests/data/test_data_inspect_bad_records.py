"""`finetune data preview` and `data stats` name bad records (FILE:LINE, bounded) and go on with the good ones;
`--strict` refuses the file with exit 2. Neither suggests a recipe key: their flags decide."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from finetune.cli_data import app


def conv(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture
def recipe(tmp_path, tokenizer_dir, write_recipe):
    data = {"train": [{"path": "builtin:tiny-chat"}], "chat_format": "mistral", "max_length": 64}
    return write_recipe(tmp_path / "r.yaml", tokenizer_dir, data)


@pytest.fixture
def one_bad(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(conv("Say hi", "hi")) + "\n{oops\n" + json.dumps(conv("2+2?", "4")) + "\n")
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])  # not a terminal: as CI sees it piped


@pytest.mark.parametrize("command", ["preview", "stats"])
def test_one_bad_record_is_named_and_the_rest_is_shown(command, one_bad, recipe):
    result = invoke(command, one_bad, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert f"{one_bad}:2: invalid JSON" in result.stderr
    assert "skipped 1 invalid record(s)" in result.stderr and "skip_invalid" not in result.output
    if command == "stats":
        assert "records: 2" in result.stdout
    else:
        assert f"{one_bad}:1" in result.stdout and f"{one_bad}:3" in result.stdout


@pytest.mark.parametrize("command", ["preview", "stats"])
def test_strict_refuses_the_file(command, one_bad, recipe):
    result = invoke(command, one_bad, "--recipe", recipe, "--strict")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: 1 invalid record(s)") and "--strict" in result.stderr
    assert f"{one_bad}:2: invalid JSON" in result.stderr and "skip_invalid" not in result.output
    assert "Traceback" not in result.output


def test_stats_json_stays_parseable_and_the_list_is_bounded(tmp_path, recipe):
    path = tmp_path / "many.jsonl"
    path.write_text(json.dumps(conv("Say hi", "hi")) + "\n" + "{oops\n" * 30)
    result = invoke("stats", path, "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["records"] == 1  # the warning goes to stderr
    assert result.stderr.count(": invalid JSON: Expecting") == 20 and "... and 10 more" in result.stderr


def test_a_file_with_only_bad_records_is_refused(tmp_path, recipe):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n[1\n")
    result = invoke("stats", path, "--recipe", recipe)
    assert result.exit_code == 2 and "every record is invalid (2)" in result.stderr, result.output
