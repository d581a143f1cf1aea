"""Tracking overhead on the tiny recipe: routing stats + drift + samples on, against all of it off.

    python bench/bench_tracking.py [--steps 8]

Runs the tiny SFT recipe twice in one process (same data, same seed, eval every 4 steps): once with
`moe.track_expert_load`, a trainable router (so router drift is probed), and 4 sample generations at each
evaluation; once with all of these off. Compares the trainer's own train seconds, which include evaluation and
the sample generations. Writes bench/results/tracking_overhead.json. On a shared CPU the run-to-run noise can
be as large as the overhead: read the figure as an upper bound, and rerun on an idle machine for a firm one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import environment  # noqa: E402

RESULT = ROOT / "bench" / "results" / "tracking_overhead.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    steps = parser.parse_args().steps
    from finetune.recipe import load_recipe
    from finetune.train import run

    common = [
        f"training.max_steps={steps}",
        "training.logging_steps=2",
        "training.eval_steps=4",
        "lora.router=trainable",
    ]
    variants = {
        "off": ["moe.track_expert_load=false", "tracking.sample_prompts=0"],
        "on": ["moe.track_expert_load=true", "tracking.sample_prompts=4", "tracking.sample_max_new_tokens=16"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in variants.items():
            recipe = load_recipe(
                ROOT / "recipes" / "tiny-mixtral-sft.yaml", [*common, *sets, f"output_dir={tmp}/{name}"]
            )
            metrics = run(recipe)
            results[name] = {"train_seconds": metrics["train_seconds"], "steps": metrics["steps"]}
            print(name, results[name])
    off, on = results["off"]["train_seconds"], results["on"]["train_seconds"]
    payload = {
        "command": f"python bench/bench_tracking.py --steps {steps}",
        "what": "train seconds (incl. eval + samples) with routing stats, drift and 4 samples/eval on vs off",
        "results": results,
        "overhead_fraction": (on - off) / off,
        "caveat": "2 shared CPU cores; run-to-run noise is of the same order on a loaded machine",
        "environment": environment(),
    }
    RESULT.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"overhead {payload['overhead_fraction']:+.1%} -> {RESULT}")


if __name__ == "__main__":
    main()
