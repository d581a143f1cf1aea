"""Repository contracts: CI runs exactly the README's test command, and ruff is clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_starts_with_run_and_test_commands():
    run_cmd, test_cmd = readme_commands()
    assert run_cmd.endswith("finetune run recipes/tiny-mixtral-sft.yaml")
    assert "pytest" in test_cmd


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_ruff_is_clean():
    for args in (
        [sys.executable, "-m", "ruff", "check", "."],
        [sys.executable, "-m", "ruff", "format", "--check", "."],
    ):
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
