"""The tiny recipe as a user runs it: wall time and peak memory of `finetune run`, for the recipe header to quote.

Runs `finetune run recipes/tiny-mixtral-sft.yaml` in a child process, samples the child's resident memory every
20 ms and splits the run into phases at the lines it prints (data summary, trainable parameters, first step line,
done). Peak memory is the child's whole-process RSS (what `time -v` calls maxrss); each phase also gets its peak
above the level at its start. Writes bench/results/tiny_run.json; tests/test_console.py checks that the recipe
header quotes it. Timings depend on machine load, which is recorded alongside.

    python bench/bench_tiny_run.py                  # the full recipe (60 steps)
    python bench/bench_tiny_run.py --max-steps 10   # quicker, for experiments (does not match the header)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
RESULT = ROOT / "bench" / "results" / "tiny_run.json"
# (phase name, stdout prefix that ends it), in order; the last phase ends with the process.
PHASES = (
    ("imports, tokenizer, data", "data:"),
    ("model load", "trainable parameters:"),
    ("trainer + first step", "step "),
    ("training, final eval", "eval "),  # the eval line is printed once the final eval is done
    ("save adapter, summary", None),
)


def run(recipe: Path, output_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "run", str(recipe), "--set", f"output_dir={output_dir}", *extra]
    samples: list[tuple[float, int]] = []
    marks: list[float] = []
    started = time.time()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc = psutil.Process(child.pid)

    def sample() -> None:
        while child.poll() is None:
            try:
                samples.append((time.time(), proc.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = []
    for line in child.stdout:
        stdout.append(line)
        prefix = PHASES[len(marks)][1] if len(marks) < len(PHASES) - 1 else None
        if prefix and line.startswith(prefix):
            marks.append(time.time())
    child.wait()
    sampler.join()
    wall = time.time() - started
    if child.returncode != 0:
        sys.exit(f"finetune run failed ({child.returncode}):\n{''.join(stdout[-30:])}")
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_bytes": max(rss for _, rss in samples),
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # Linux reports KiB
        "phases": phase_table(samples, [started, *marks, time.time()]),
        "stdout_tail": "".join(stdout[-20:]),
    }


def phase_table(samples: list[tuple[float, int]], bounds: list[float]) -> list[dict]:
    """Per phase: seconds, RSS at its start, its peak, and the peak above the start (MB)."""
    rows = []
    for (name, _), start, end in zip(PHASES, bounds, bounds[1:], strict=False):
        inside = [rss for t, rss in samples if start <= t <= end]
        if not inside:
            continue
        before = [rss for t, rss in samples if t <= start]
        level = before[-1] if before else inside[0]
        rows.append(
            {
                "phase": name,
                "seconds": round(end - start, 1),
                "start_mb": round(level / 2**20),
                "peak_mb": round(max(inside) / 2**20),
                "above_start_mb": round((max(inside) - level) / 2**20),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (not recorded)")
    args = parser.parse_args()
    extra = ["--set", f"training.max_steps={args.max_steps}"] if args.max_steps else []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        result = run(RECIPE, out, extra)
        metrics = json.loads((out / "metrics.json").read_text())
    payload = {
        "command": "finetune run recipes/tiny-mixtral-sft.yaml --set output_dir=<tmp>" + " ".join(["", *extra]),
        "wall_seconds": result["wall_seconds"],
        "peak_rss_bytes": result["peak_rss_bytes"],
        "maxrss_bytes": result["maxrss_bytes"],
        "first_loss": metrics["first_loss"],
        "final_train_loss": metrics["final_train_loss"],
        "eval_loss": metrics["eval_loss"],
        "tokens_per_second": metrics["tokens_per_second"],
        "steps": metrics["steps"],
        "metrics_peak_memory": metrics["peak_memory"],
        "phases": result["phases"],
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "versions": metrics.get("versions"),
    }
    for row in payload["phases"]:
        print(
            f"{row['phase']:<26} {row['seconds']:>7.1f} s  start {row['start_mb']:>5} MB  "
            f"peak {row['peak_mb']:>5} MB  (+{row['above_start_mb']} MB)"
        )
    print(
        f"wall {payload['wall_seconds']} s, peak RSS {payload['peak_rss_bytes'] / 1e9:.2f} GB, "
        f"load average {payload['load_average_before']} -> {payload['load_average_after']}"
    )
    if args.max_steps:
        print("(not written: --max-steps runs do not match the recipe header)")
        return
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
