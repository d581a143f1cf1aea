"""A user error inside a rank of `--num-processes` (a bad data record) is printed once, as FILE:LINE, with exit 2:
no other rank's traceback and no torchrun failure report, as a single process would say it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from finetune.train import launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"

# A stand-in for the launcher: a "rank" leaves its user error, then the aftermath a real launch prints follows.
FAKE_LAUNCH = """
import os, sys, time
from finetune.errors import UserError
from finetune.train.launch import report_to_launcher
sys.stderr.write("printed before the report, kept\\n"); sys.stderr.flush()
os.environ["RANK"] = "1"
assert report_to_launcher(UserError("data problem", ["/data/train.jsonl:7: invalid JSON"]))
os.environ["RANK"] = "0"
assert report_to_launcher(UserError("data problem", ["/data/train.jsonl:3: invalid JSON"]))
time.sleep(0.2)
sys.stderr.write("[rank1]: Traceback (most recent call last):\\nChildFailedError: finetune FAILED\\n")
raise SystemExit(1)
"""


def test_run_prints_the_lowest_ranks_error_once_and_drops_the_aftermath(capfd):
    assert launch.run([sys.executable, "-c", FAKE_LAUNCH], echo=print) == 2
    err = capfd.readouterr().err
    assert "printed before the report, kept" in err
    assert err.count("error: ") == 1 and "/data/train.jsonl:3: invalid JSON" in err and ":7:" not in err, err
    assert "Traceback" not in err and "ChildFailedError" not in err, err


def test_outside_a_launch_a_rank_error_is_not_diverted(tmp_path):
    assert not launch.report_to_launcher(ValueError("x"), env={})
    assert not launch.report_to_launcher(ValueError("x"), env={launch.ERRORS_ENV: str(tmp_path / "gone")})


def test_bad_record_under_num_processes_is_one_file_line_and_exit_2(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(12)]  # fmt: skip
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, '{"messages": [broken')  # line 6
    data.write_text("\n".join(lines) + "\n")
    sets = [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'out'}", f"data.train.0.path={data}",
            "training.max_steps=2"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(TINY), "--num-processes", "2",
         *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    err = result.stderr
    assert [line for line in err.splitlines() if f"{data}:" in line] == [
        f"  - {data}:6: invalid JSON: Expecting value (column 15)"
    ], err
    assert err.count("error: ") == 1, err
    for aftermath in ("Traceback", "[rank", "ChildFailedError", "exitcode", "torch.distributed", "SIGTERM"):
        assert aftermath not in err + result.stdout, err
    assert not (tmp_path / "out" / "adapter").exists()
