"""Shared by the `finetune eval` tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
SAMPLES = ROOT / "data_tools" / "samples"
GENERATION_FILE = SAMPLES / "tiny_generation.jsonl"
TASK = "tiny_arith_mc"
RUN_STEPS = 12  # enough for the tiny recipe's learning rate to move held-out loss by more than a nat

runner = CliRunner()


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def read_eval(folder: Path) -> dict:
    return json.loads((folder / "eval.json").read_text())
