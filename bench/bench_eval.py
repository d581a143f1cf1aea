"""Evaluation benchmark: `finetune eval` (base and adapter columns from one model load) against lm-eval's own HFLM
run on the stock model (one column per load), on the same mini Mixtral and the shipped local task, in one run.

Each row is its own process, timed from start to exit (imports, load, evaluation), so it is what a user waits for.
The claim to check: two columns from one load cost well under twice one column, because the load is paid once.

    python bench/bench_eval.py                       # hidden 512, ffn 1024, 4 layers, 8 experts, fp32, CPU
    python bench/bench_eval.py --layers 2 --out bench/results/eval.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment, markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
TASK = "tiny_arith_mc"
SAMPLES = ROOT / "data_tools" / "samples"
STOCK = """
import json, sys, os
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model, adapter, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.chdir(sys.argv[4])  # the task's relative data_files
kwargs = {"peft": adapter} if adapter else {}
lm = HFLM(pretrained=model, dtype="float32", device="cpu", batch_size=batch, **kwargs)
out = simple_evaluate(model=lm, tasks=[sys.argv[5]], task_manager=TaskManager(include_path="."), log_samples=False)
print(json.dumps({k: v for k, v in out["results"][sys.argv[5]].items() if isinstance(v, float)}))
"""


def build(root: Path, layers: int) -> tuple[Path, Path]:
    """A mini Mixtral (fp32, random) and a random adapter on attention, both expert projections and the router."""
    import torch

    from finetune.model.tiny import TinySpec, write_tiny_model
    from finetune.moe import apply_lora, load_mixtral, save_adapter
    from tests.conftest import random_lora_

    spec = TinySpec(hidden_size=512, intermediate_size=1024, layers=layers, heads=8, kv_heads=2)
    model_dir = write_tiny_model(root / "model", spec)
    model, _ = load_mixtral(model_dir, quantization="none", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32,
                       dropout=0.0, expert_targets=["gate_up_proj", "down_proj"], expert_r=8, expert_alpha=16)  # fmt: skip
    random_lora_(model, seed=0, std=0.02)
    save_adapter(model, root / "adapter")
    return model_dir, root / "adapter"


CPU_SECONDS: dict[str, float] = {}  # command → user + system CPU seconds of its process (robust to a busy machine)


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{result.stderr[-3000:]}")
    CPU_SECONDS[" ".join(command)] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, result.stdout


def ours(model: Path, adapter: Path | None, out: Path, batch: int) -> tuple[float, dict]:
    command = [sys.executable, "-m", "finetune", "eval", "--model", str(model), "--quantization", "none",
               "--tasks", TASK, "--batch-size", str(batch), "-o", str(out)]  # fmt: skip
    command += ["--adapter", str(adapter)] if adapter else []
    seconds, _ = timed(command, ROOT)
    result = json.loads((out / "eval.json").read_text())
    cpu = CPU_SECONDS[" ".join(command)]
    return seconds, {"cpu_seconds": cpu, "scores": result["tasks"][TASK], "phases": result["seconds"]}


def stock(model: Path, adapter: Path | None, batch: int) -> tuple[float, dict]:
    command = [sys.executable, "-c", STOCK, str(model), str(adapter or ""), str(batch), str(SAMPLES), TASK]
    seconds, stdout = timed(command, ROOT)
    return seconds, {
        "cpu_seconds": CPU_SECONDS[" ".join(command)],
        "scores": json.loads(stdout.strip().splitlines()[-1]),
    }


def load_and_tasks(detail: dict) -> str:
    phases = detail.get("phases")
    return f"{phases['load']:.1f} s / {phases['tasks']:.1f} s" if phases else "-"


def accuracy(scores: dict) -> str:
    if "base" in scores:
        return ", ".join(f"{column} acc {values['acc']:.3f}" for column, values in scores.items())
    return f"acc {scores['acc,none']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, adapter = build(root, args.layers)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        rows = {
            "finetune eval: base + adapter, one load": ours(model, adapter, root / "both", args.batch_size),
            "finetune eval: base only": ours(model, None, root / "base", args.batch_size),
            "lm-eval HFLM: stock model": stock(model, None, args.batch_size),
            "lm-eval HFLM: stock model + PEFT adapter": stock(model, adapter, args.batch_size),
        }
    one_column = rows["lm-eval HFLM: stock model"][0]
    two_runs = one_column + rows["lm-eval HFLM: stock model + PEFT adapter"][0]
    one_cpu = rows["lm-eval HFLM: stock model"][1]["cpu_seconds"]
    table = [[name, f"{seconds:.1f} s", f"{seconds / one_column:.2f}x", f"{detail['cpu_seconds']:.1f} s",
              f"{detail['cpu_seconds'] / one_cpu:.2f}x", load_and_tasks(detail), accuracy(detail["scores"])]
             for name, (seconds, detail) in rows.items()]  # fmt: skip
    ours_both = rows["finetune eval: base + adapter, one load"][1]["scores"]
    agree = (
        ours_both["base"]["acc"] == rows["lm-eval HFLM: stock model"][1]["scores"]["acc,none"]
        and ours_both["adapter"]["acc"] == rows["lm-eval HFLM: stock model + PEFT adapter"][1]["scores"]["acc,none"]
    )
    print(f"mini Mixtral: {args.layers} layers, hidden 512, 8 experts, fp32, {size / 2**20:.0f} MiB; task {TASK}")
    header = ["run", "wall", "wall vs one lm-eval column", "CPU", "CPU vs one lm-eval column", "load / tasks",
              "scores"]  # fmt: skip
    print(markdown_table(header, table))
    both = rows["finetune eval: base + adapter, one load"][0]
    print(f"two columns, one load: {both / one_column:.2f}x one lm-eval column; two lm-eval runs: {two_runs:.1f} s")
    print(f"accuracies equal to lm-eval's own: {agree}")
    payload = {
        "command": "python bench/bench_eval.py " + " ".join(sys.argv[1:]),
        "shape": {"hidden": 512, "ffn": 1024, "layers": args.layers, "experts": 8, "dtype": "float32"},
        "checkpoint_bytes": size,
        "task": TASK,
        "batch_size": args.batch_size,
        "rows": {name: {"seconds": seconds, **detail} for name, (seconds, detail) in rows.items()},
        "two_columns_over_one_lm_eval_column": both / one_column,
        "two_columns_over_one_lm_eval_column_cpu": rows["finetune eval: base + adapter, one load"][1]["cpu_seconds"]
        / one_cpu,
        "two_lm_eval_runs_seconds": two_runs,
        "scores_equal_lm_eval": agree,
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "environment": environment(),
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
