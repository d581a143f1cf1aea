"""`finetune data preview/stats/tokenize/convert/validate` on preference pairs and unpaired records."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from finetune.cli_data import app

runner = CliRunner()


@pytest.fixture
def recipe(tmp_path, tokenizer_dir, write_recipe):
    data = {"train": [{"path": "builtin:tiny-preference"}], "chat_format": "mistral", "max_length": 24}
    return write_recipe(tmp_path / "r.yaml", tokenizer_dir, data)


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})
    return result.exit_code, result.output


@pytest.fixture
def pairs(tmp_path, write_jsonl):
    return write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "What is 2 + 2?", "chosen": "4 Have a nice day!", "rejected": "4"},
            {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "hi there", "rejected": "no"},
        ],
    )


def test_tokenize_writes_prompt_chosen_rejected_ids(tmp_path, pairs, recipe, mistral_instruct):
    out = tmp_path / "ids.jsonl"
    code, text = run("tokenize", pairs, "--recipe", recipe, "-o", out)
    assert code == 0, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{pairs}:1", f"{pairs}:2"]
    assert set(rows[0]) == {"where", "prompt_ids", "chosen_ids", "rejected_ids"}
    sp = mistral_instruct.tokenizer
    assert rows[0]["prompt_ids"] == [1, *sp.encode("[INST] What is 2 + 2? [/INST]", False, False)]
    assert rows[0]["chosen_ids"] == sp.encode("4 Have a nice day!", False, True)
    assert rows[0]["rejected_ids"] == sp.encode("4", False, True)


def test_preview_shows_prompt_then_chosen_and_rejected(pairs, recipe):
    code, text = run("preview", pairs, "--recipe", recipe, "-n", "1")
    assert code == 0, text
    assert f"{pairs}:1" in text and "[INST] What is 2 + 2? [/INST]" in text
    assert "chosen (" in text and "rejected (" in text and "Have a nice day!" in text
    assert text.index("prompt (") < text.index("chosen (") < text.index("rejected (")
    assert "Say hi" not in text  # -n 1


def test_stats_on_pairs_and_unpaired(tmp_path, recipe):
    code, text = run("stats", "builtin:tiny-preference", "--recipe", recipe, "--json")
    assert code == 0, text
    s = json.loads(text[text.index("{") :])
    assert s["records"] == s["pairs"] == 400
    assert set(s["tokens"]) == {"prompt", "chosen", "rejected"}
    assert s["tokens"]["chosen"]["mean"] > s["tokens"]["rejected"]["mean"]
    assert 0 < s["truncated"] < 400 and s["max_length"] == 24
    code, text = run("stats", "builtin:tiny-unpaired", "--recipe", recipe, "--plot", tmp_path / "len.png")
    assert code == 0, text
    assert "desirable: 200  undesirable: 200" in text and "completion" in text
    assert "truncated at max_length 24:" in text and (tmp_path / "len.png").stat().st_size > 0


def test_convert_to_unpaired_and_back_through_validate(tmp_path, pairs, write_jsonl):
    out = tmp_path / "u.jsonl"
    code, text = run("convert", pairs, "--to", "unpaired", "-o", out)
    assert code == 0 and "wrote 4 records (preference → unpaired)" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False, True, False]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "4"}]
    code, text = run("validate", out)
    assert code == 0 and "4 records, 4 valid, 0 invalid" in text
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    code, text = run("convert", chat, "--to", "unpaired", "-o", tmp_path / "x.jsonl")
    assert code == 2 and "no chosen/rejected pairs to unpair" in text and not (tmp_path / "x.jsonl").exists()


def test_validate_reports_bad_unpaired_labels(tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "u.jsonl",
        [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": 1}],
    )
    code, text = run("validate", path)
    assert code == 2 and f"{path}:2: label must be true (desirable) or false (undesirable), got int" in text
    assert "label not true/false: 1" in text
