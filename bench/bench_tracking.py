"""Tracking overhead on the tiny recipe: routing stats + drift + samples on, against all of it off.

    python bench/bench_tracking.py [--steps 8]

Runs the tiny SFT recipe in one process after a warm-up run (same data, same seed, a trainable router so router
drift is probed, eval every 6 steps): with tracking off, with routing stats and drift, and with routing plus 4
sample generations at each evaluation. Compares the trainer's own train seconds, which include evaluation and
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
    parser.add_argument("--steps", type=int, default=12)
    steps = parser.parse_args().steps
    from finetune.recipe.schema import load_recipe
    from finetune.train.run import run

    common = [
        f"training.max_steps={steps}",
        "training.logging_steps=2",
        "training.eval_steps=6",
        "lora.router=trainable",
    ]
    variants = {
        "off": ["moe.track_expert_load=false", "tracking.sample_prompts=0"],
        "routing": ["moe.track_expert_load=true", "tracking.sample_prompts=0"],
        "routing+samples": [
            "moe.track_expert_load=true",
            "tracking.sample_prompts=4",
            "tracking.sample_max_new_tokens=16",
        ],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = load_recipe(
            ROOT / "recipes" / "tiny-mixtral-sft.yaml", ["training.max_steps=2", f"output_dir={tmp}/warm"]
        )
        run(warm)  # one-time costs (first kernels, caches) are paid here, not by whichever variant runs first
        for name, sets in variants.items():
            recipe = load_recipe(
                ROOT / "recipes" / "tiny-mixtral-sft.yaml", [*common, *sets, f"output_dir={tmp}/{name}"]
            )
            metrics = run(recipe)
            results[name] = {"train_seconds": metrics["train_seconds"], "steps": metrics["steps"]}
            print(name, results[name])
    off = results["off"]["train_seconds"]
    overhead = {name: (r["train_seconds"] - off) / off for name, r in results.items() if name != "off"}
    payload = {
        "command": f"python bench/bench_tracking.py --steps {steps}",
        "what": "train seconds (incl. eval + samples): routing stats and drift, then also 4 samples per eval, vs off",
        "results": results,
        "overhead_fraction": overhead,
        "caveat": "2 shared CPU cores; run-to-run noise is of the same order on a loaded machine",
        "environment": environment(),
    }
    RESULT.write_text(json.dumps(payload, indent=2) + "\n")
    print(", ".join(f"{name} {value:+.1%}" for name, value in overhead.items()), "->", RESULT)


if __name__ == "__main__":
    main()
