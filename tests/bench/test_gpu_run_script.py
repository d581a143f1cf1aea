"""bench/gpu_run.sh, as far as a CPU allows: its guards on the wheels folder answer before anything is installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_run.sh"


def dry_run(wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHEELS": str(wheels)}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)


def test_missing_or_empty_wheels_folder_says_how_to_make_it(tmp_path):
    for wheels in (tmp_path / "absent", tmp_path):
        result = dry_run(wheels)
        assert result.returncode == 2
        assert "pip download command" in result.stderr and "Traceback" not in result.stderr


def test_wheels_over_the_64_mib_call_limit_are_refused(tmp_path):
    with open(tmp_path / "huge-0.0-py3-none-any.whl", "wb") as f:
        f.truncate(65 * 2**20)
    result = dry_run(tmp_path)
    assert result.returncode == 2
    assert "over the 64 MiB limit" in result.stderr
