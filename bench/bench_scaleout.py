"""One process against two through accelerate (DDP and FSDP2, CPU over gloo): tokens/s and per-rank model bytes.

Each setup trains the same rows per optimizer step (1 process x batch 2 x accumulation 2; 2 ranks x batch 1 x
accumulation 2) on a tiny Mixtral written by `finetune tiny-model`, and reports what its metrics.json says:
global and per-device tokens/s, rank 0's resident base bytes (whole, and the experts alone), peak RSS of rank 0 and
the final loss. The single process is the baseline in the same run. On a 2-core machine two ranks share the cores
the one process had, so the point is the per-rank bytes and that the loss is the same, not a speed-up.

    python bench/bench_scaleout.py                                  # the tests' tiny model, 8 steps
    python bench/bench_scaleout.py --hidden-size 512 --intermediate-size 1792 --layers 4   # experts dominate more
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import environment, fmt_bytes, fmt_ratio, markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
RESULT = ROOT / "bench" / "results" / "scaleout.json"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
SETUPS = {  # name: (launcher prefix, per-device batch)
    "1 process": ([sys.executable], 2),
    "DDP, 2 ranks": ([*LAUNCH, str(ROOT / "accelerate" / "cpu-ddp.yaml")], 1),
    "FSDP2, 2 ranks": ([*LAUNCH, str(ROOT / "accelerate" / "cpu-fsdp2.yaml")], 1),
}


def train(name: str, model: Path, out: Path, steps: int) -> dict:
    launcher, batch = SETUPS[name]
    settings = (
        f"model.path={model}",
        f"output_dir={out}",
        f"training.max_steps={steps}",
        f"training.batch_size={batch}",
        "training.gradient_accumulation_steps=2",
        "training.logging_steps=1",
        "data.eval_fraction=0",
        "tracking.sample_prompts=0",
    )
    args = [arg for s in settings for arg in ("--set", s)]
    result = subprocess.run(
        [*launcher, "-m", "finetune", "run", str(RECIPE), *args], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        shape = ["--hidden-size", str(args.hidden_size), "--intermediate-size", str(args.intermediate_size)]
        subprocess.run(
            [sys.executable, "-m", "finetune", "tiny-model", "-o", str(model), *shape, "--layers", str(args.layers)],
            check=True,
            capture_output=True,
        )
        for name in SETUPS:
            m = train(name, model, Path(tmp) / name.replace(" ", "").replace(",", "-"), args.steps)
            results[name] = {
                key: m.get(key)
                for key in (
                    "world_size",
                    "tokens_per_second",
                    "tokens_per_second_per_device",
                    "train_seconds",
                    "model_bytes",
                    "model_bytes_per_rank",
                    "model_bytes_per_rank_by_group",
                    "peak_memory",
                    "first_loss",
                    "final_train_loss",
                )
            }
    base = results["1 process"]
    for name, r in results.items():
        experts = r["model_bytes_per_rank_by_group"]["experts"]
        rows.append(
            [
                name,
                f"{r['tokens_per_second']:.0f}{fmt_ratio(r['tokens_per_second'], base['tokens_per_second'])}",
                f"{r['tokens_per_second_per_device']:.0f}",
                f"{fmt_bytes(r['model_bytes_per_rank'])}{fmt_ratio(r['model_bytes_per_rank'], base['model_bytes'])}",
                f"{fmt_bytes(experts)}{fmt_ratio(experts, base['model_bytes_per_rank_by_group']['experts'])}",
                fmt_bytes(r["peak_memory"]),
                f"{r['first_loss']:.4f} -> {r['final_train_loss']:.4f}",
            ]
        )
    header = ["setup", "tokens/s (all ranks)", "per device", "base bytes on rank 0", "experts on rank 0",
              "peak RSS rank 0", "loss"]  # fmt: skip
    print(markdown_table(header, rows))
    shape = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size, "layers": args.layers}
    path = write_json(RESULT, {"steps": args.steps, "model": shape, "results": results, "environment": environment()})
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
