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


def test_silently_incorrect_autograd_warning_fails_the_suite():
    """PyTorch reports wrong gradients as a UserWarning; the suite's filters make it an error, not noise."""
    import warnings

    import pytest

    message = (
        "aten::foo: an autograd kernel was not registered to the Autograd key(s) but we are trying to backprop "
        "through it. This may lead to silently incorrect behavior."
    )
    with pytest.raises(UserWarning, match="silently incorrect"):
        warnings.warn(message, UserWarning, stacklevel=1)


def test_suite_filters_no_warning_category_wholesale():
    """Only named warnings may be ignored: a blanket UserWarning/FutureWarning filter would hide the one above."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib

    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for entry in filters:
        action, message, category = ([*entry.split(":"), "", ""])[:3]
        if action == "ignore" and category in ("UserWarning", "FutureWarning", "RuntimeWarning"):
            assert message, f"{entry!r} ignores every {category}; name the message instead"
