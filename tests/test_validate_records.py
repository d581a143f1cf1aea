"""`finetune validate` reads every data record through the loader `run` uses: a broken line is found by validate,
with the same FILE:LINE as run gives, unless `--no-data-check`; a refused recipe is still printed, resolved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
PAIR = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}  # fmt: skip


def write_setup(tmp: Path, lines: list[str], method: str = "sft", **data) -> Path:
    (tmp / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    recipe = {
        "method": method,
        "model": {"path": "tiny-random-mixtral"},
        "data": {"train": [{"path": str(tmp / "train.jsonl")}], "max_length": 64, **data},
        "training": {"max_steps": 2},
        "output_dir": str(tmp / "out"),
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])  # not a terminal: output as CI sees it piped


def test_validate_refuses_a_broken_line_as_run_does(tmp_path):
    recipe = write_setup(tmp_path, [json.dumps(GOOD), "{broken", json.dumps(GOOD)])
    where = f"{tmp_path / 'train.jsonl'}:2: invalid JSON"
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert where in result.stderr and "data.skip_invalid: true" in result.stderr
    assert "1 problem(s)" in result.stderr and "Traceback" not in result.output
    ran = cli("run", recipe)  # run reads the data before loading the model, with the same loader
    assert ran.exit_code == 2 and where in ran.stderr, ran.output
    assert not (tmp_path / "out").exists()


def test_no_data_check_skips_reading_the_records(tmp_path):
    recipe = write_setup(tmp_path, [json.dumps(GOOD), "{broken"])
    result = cli("validate", recipe, "--no-data-check")
    assert result.exit_code == 0, result.output
    assert "valid" in result.stderr
    assert "--no-data-check" in cli("validate", "--help").output


def test_preference_records_are_checked_for_dpo(tmp_path):
    no_rejected = {k: v for k, v in PAIR.items() if k != "rejected"}
    recipe = write_setup(tmp_path, [json.dumps(PAIR), json.dumps(no_rejected)], method="dpo")
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'train.jsonl'}:2: " in result.stderr and "rejected" in result.stderr


def test_skip_invalid_passes_unless_nothing_is_left(tmp_path):
    recipe = write_setup(tmp_path, [json.dumps(GOOD), "{broken"], skip_invalid=True)
    assert cli("validate", recipe).exit_code == 0
    recipe = write_setup(tmp_path, ["{broken", "[1, 2"], skip_invalid=True)
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "every record is invalid (2)" in result.stderr, result.output


def test_many_bad_records_are_listed_up_to_a_bound(tmp_path):
    recipe = write_setup(tmp_path, [json.dumps(GOOD)] + ["{broken"] * 80)
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "80 invalid record(s)" in result.stderr
    assert result.stderr.count("invalid JSON") == 50 and "... and 30 more" in result.stderr


@pytest.mark.parametrize("problem", ["finished-run", "bad-record"])
def test_a_refused_recipe_is_still_printed_resolved(tmp_path, problem):
    lines = [json.dumps(GOOD)] + (["{broken"] if problem == "bad-record" else [])
    recipe = write_setup(tmp_path, lines)
    if problem == "finished-run":
        (tmp_path / "out" / "adapter").mkdir(parents=True)
        (tmp_path / "out" / "metrics.json").write_text("{}")
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert result.stdout.startswith(f"# {recipe}: refused (see the error)")
    resolved = yaml.safe_load(result.stdout)
    assert resolved["data"]["max_length"] == 64 and resolved["lora"]["r"] == 16  # defaults resolved
