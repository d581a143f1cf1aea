"""Predicted against measured training peak: `finetune plan`'s memory model checked on a real training run.

Each setting runs in its own subprocess (so earlier runs' freed memory can't hide a peak): it loads a Mixtral-shaped
checkpoint with the recipe's loader, attaches LoRA, and trains a few steps through TRL's SFTTrainer with the run path's
own trainer arguments on random full-length rows. Measured:
  CPU   RSS peak above the level just before loading (what the plan's total predicts on CPU);
  CUDA  torch.cuda.max_memory_allocated (the plan's peak allocated, without CUDA context and allocator slack).

    python bench/plan_check.py                            # CPU, small Mixtral shape, 4 settings (~1-2 min, 2 cores)
    python bench/plan_check.py --device cuda --shape real --seq 2048,4096   # on a GPU: 2 layers at real dims
Writes $OUT/plan_check.json when OUT is set, else bench/results/plan_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import Shape, write_model

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "test": Shape(hidden=512, ffn=1792, layers=2, experts=8, top_k=2, heads=8, kv_heads=2, vocab=8000),
    "cpu": Shape(hidden=512, ffn=1792, layers=4, experts=8, top_k=2, heads=8, kv_heads=2, vocab=8000),
    "real": Shape(hidden=4096, ffn=14336, layers=2, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000),
}


def recipe_for(model_dir: Path, seq: int, grad_ckpt: bool, dtype: str, device: str, steps: int, optimizer: str):
    from finetune.recipe import load_recipe

    overrides = [f"model.path={model_dir}", f"model.dtype={dtype}", f"model.device={device}",
                 f"data.max_length={seq}", f"training.gradient_checkpointing={str(grad_ckpt).lower()}",
                 f"training.max_steps={steps}", "training.batch_size=1", f"training.optimizer={optimizer}",
                 "training.logging_steps=1", "lora.dropout=0.0"]  # fmt: skip
    return load_recipe(ROOT / "recipes" / "tiny-mixtral-sft.yaml", overrides)


def high_water_mark() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_high_water_mark() -> int | None:
    """Reset this process's peak RSS (Linux `clear_refs` 5) and return the RSS now; None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        import psutil

        return psutil.Process().memory_info().rss
    except OSError:
        return None


def measure(args: argparse.Namespace) -> dict:
    """One setting, in this process: predicted (plan) and measured peak."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from finetune.memory import PeakMemory
    from finetune.model import load_model, load_tokenizer, resolve_device, resolve_dtype
    from finetune.plan import Planner, Settings, read_config
    from finetune.train import trainer_arguments

    model_dir = Path(args.model_dir)
    recipe = recipe_for(model_dir, args.seq, args.grad_ckpt, args.dtype, args.device, args.steps, args.optimizer)
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    tokenizer = load_tokenizer(model_dir)
    config = read_config(model_dir)
    memory = Planner(recipe, config, dtype, device.type, 0).memory(Settings.of(recipe))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, config.vocab_size, (args.steps + 1, args.seq), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    out = Path(tempfile.mkdtemp(prefix="plan-check-"))
    kwargs = trainer_arguments(recipe, out, device, dtype)
    kwargs.update(dataset_kwargs={"skip_prepare_dataset": True}, packing=False, padding_free=False, save_strategy="no")
    start_rss = reset_high_water_mark()
    with PeakMemory(device) as peak:
        loaded = load_model(recipe.model, recipe.lora, model_dir, train_aux=recipe.moe.aux_loss)
        trainer = SFTTrainer(model=loaded.model, args=SFTConfig(**kwargs), train_dataset=data,
                             processing_class=tokenizer)  # fmt: skip
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    if device.type == "cuda":
        measured = peak.peak
    else:  # the kernel's exact high-water mark when it can be reset; a sampler can miss millisecond peaks
        measured = high_water_mark() - start_rss if start_rss is not None else peak.delta
    predicted = memory.peak_allocated if device.type == "cuda" else memory.total
    result = {"seq": args.seq, "grad_ckpt": args.grad_ckpt, "dtype": str(dtype).removeprefix("torch."),
              "device": device.type, "optimizer": args.optimizer, "steps": args.steps,
              "predicted_bytes": predicted, "measured_bytes": measured, "ratio": predicted / measured,
              "resident_bytes": loaded.report.model_bytes, "tokens_per_s": args.steps * args.seq / seconds,
              "lines": memory.lines}  # fmt: skip
    if device.type == "cuda":
        result["measured_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["predicted_with_slack_bytes"] = memory.total - memory.lines.get("CUDA context (constant)", 0)
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def run_settings(model_dir: Path, settings: list[tuple[int, bool]], *, dtype: str, device: str, steps: int,
                 optimizer: str, timeout: float = 600, parallel: int = 1) -> list[dict]:  # fmt: skip
    """Each (seq, grad_ckpt) in a fresh subprocess (`parallel` at once: RSS is per process); returns their results."""
    from concurrent.futures import ThreadPoolExecutor

    def one(setting: tuple[int, bool]) -> dict:
        seq, ckpt = setting
        cmd = [sys.executable, __file__, "--one", "--model-dir", str(model_dir), "--seq", str(seq), "--dtype", dtype,
               "--device", device, "--steps", str(steps), "--optimizer", optimizer] + (["--grad-ckpt"] if ckpt else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"plan_check setting seq={seq} ckpt={ckpt} failed:\n{proc.stderr[-3000:]}")
        return json.loads(line)

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(one, settings))


def table(results: list[dict]) -> str:
    rows = [
        "| max_length | checkpointing | dtype | predicted | measured | predicted / measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(f"| {r['seq']} | {'on' if r['grad_ckpt'] else 'off'} | {r['dtype']} | "
                    f"{r['predicted_bytes'] / 2**20:,.0f} MiB | {r['measured_bytes'] / 2**20:,.0f} MiB | {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir")
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--seq", default="512,1024")
    p.add_argument("--grad-ckpt", action="store_true", help="with --one: checkpointing on")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer", default="adamw_torch")
    p.add_argument("--parallel", type=int, default=1, help="settings measured at once (each in its own process)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "finetune-plan-check"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.one:
        args.seq = int(args.seq)
        print(json.dumps(measure(args)), flush=True)
        return 0
    from _common import environment, write_json

    from finetune.tiny import write_tokenizer

    shape = (
        SHAPES[args.shape] if args.layers is None else Shape(**{**asdict(SHAPES[args.shape]), "layers": args.layers})
    )
    model_dir = write_model(args.work_dir, shape, device="cuda" if args.device == "cuda" else "cpu")
    if not (model_dir / "tokenizer.json").exists():
        write_tokenizer(model_dir)
    settings = [(int(s), ckpt) for s in args.seq.split(",") for ckpt in (False, True)]
    results = run_settings(model_dir, settings, dtype=args.dtype, device=args.device, steps=args.steps,
                           optimizer=args.optimizer, parallel=args.parallel)  # fmt: skip
    print(table(results), flush=True)
    out = args.out or (Path(os.environ["OUT"]) / "plan_check.json" if os.environ.get("OUT") else
                       ROOT / "bench" / "results" / "plan_check.json")  # fmt: skip
    print(f"wrote {write_json(out, {'shape': asdict(shape), 'environment': environment(), 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
