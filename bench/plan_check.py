"""Predicted against measured training peak: `finetune plan`'s memory model checked on a real training run.

Each setting runs in its own subprocess (so earlier runs' freed memory can't hide a peak): it loads a Mixtral-shaped
checkpoint with the recipe's loader, attaches LoRA, and trains a few steps through TRL's SFTTrainer with the run path's
own trainer arguments on random full-length rows. Measured:
  CPU   RSS peak above the level just before loading (what the plan's total predicts on CPU), with glibc's mmap
        threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): with its default, which rises to the largest block
        freed, freed tensors stay resident at random, and one setting's peak varied 590-700 MiB from run to run on
        one idle machine; fixed, it is the live peak, the same to 1 MiB every run, as CUDA's allocated peak is;
  CUDA  torch.cuda.max_memory_allocated (the plan's peak allocated, without CUDA context and allocator slack).

    python bench/plan_check.py                            # CPU, small Mixtral shape, 4 settings (~1-2 min, 2 cores)
    python bench/plan_check.py --device cuda --shape real --seq 2048,4096   # on a GPU: 2 layers at real dims
Writes $OUT/plan_check.json when OUT is set, else bench/results/plan_check.json, after every setting (so a run cut
short keeps what it measured). Each setting runs at most --timeout seconds, and none starts after --budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import Shape, write_model

ROOT = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value, kept fixed (see the docstring)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
SHAPES = {
    "test": Shape(hidden=512, ffn=1792, layers=2, experts=8, top_k=2, heads=8, kv_heads=2, vocab=8000),
    "cpu": Shape(hidden=512, ffn=1792, layers=4, experts=8, top_k=2, heads=8, kv_heads=2, vocab=8000),
    "real": Shape(hidden=4096, ffn=14336, layers=2, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000),
}


def recipe_for(model_dir: Path, seq: int, grad_ckpt: bool, dtype: str, device: str, steps: int, optimizer: str):
    from finetune.recipe.schema import load_recipe

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
    from finetune.model.load import load_model, load_tokenizer, resolve_device, resolve_dtype
    from finetune.plan.config import read_config
    from finetune.plan.estimate import Planner, Settings
    from finetune.train.arguments import trainer_arguments

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
                 optimizer: str, timeout: float = 600, parallel: int = 1, budget: float | None = None,
                 on_result=None, raise_on_error: bool = True) -> list[dict]:  # fmt: skip
    """Each (seq, grad_ckpt) in a fresh subprocess (`parallel` at once: RSS is per process); returns their results.

    Each setting runs at most `timeout` seconds; none starts after `budget` seconds. `on_result` sees the results so
    far after every setting (main writes the JSON there). A failed, timed-out or skipped setting raises, or with
    `raise_on_error=False` becomes a row with status "error" and its reason."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    results: list[dict | None] = [None] * len(settings)

    def one(index: int) -> dict:
        seq, ckpt = settings[index]
        row = {"seq": seq, "grad_ckpt": ckpt, "status": "error"}
        left = timeout if budget is None else min(timeout, budget - (time.perf_counter() - started))
        cmd = [sys.executable, __file__, "--one", "--model-dir", str(model_dir), "--seq", str(seq), "--dtype", dtype,
               "--device", device, "--steps", str(steps), "--optimizer", optimizer] + (["--grad-ckpt"] if ckpt else [])  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if device == "cpu" else None
        if left < 10:
            row["reason"] = f"skipped: {max(left, 0):.0f}s of the {budget:.0f}s budget left"
        else:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT, env=env)
                line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
                if proc.returncode or line is None:
                    row["reason"] = f"exit {proc.returncode}: {proc.stderr[-3000:]}"
                else:
                    row = {**json.loads(line), "status": "ok"}
            except subprocess.TimeoutExpired:
                row["reason"] = f"timed out after {left:.0f}s"
        row["wall_s"] = round(time.perf_counter() - started, 1)
        if row["status"] != "ok" and raise_on_error:
            raise RuntimeError(f"plan_check setting seq={seq} ckpt={ckpt} failed: {row['reason']}")
        results[index] = row
        if on_result is not None:
            on_result([r for r in results if r is not None])
        return row

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(one, range(len(settings))))


def table(results: list[dict]) -> str:
    rows = [
        "| max_length | checkpointing | dtype | predicted | measured | predicted / measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("status", "ok") != "ok":
            rows.append(f"| {r['seq']} | {'on' if r['grad_ckpt'] else 'off'} | error: {r['reason'][:100]} | | | |")
            continue
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
    p.add_argument("--checkpointing", choices=["both", "on", "off"], default="both", help="settings per max_length")
    p.add_argument("--tokenizer", type=Path, help="copy the tokenizer files from this folder (default: convert)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per setting")
    p.add_argument("--budget", type=float, default=None, help="seconds for all settings: none starts after it")
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
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("plan_check: --device cuda, but no CUDA device here", file=sys.stderr)
            return 2
    from _common import environment, write_json

    from finetune.model.tiny import write_tokenizer

    shape = (
        SHAPES[args.shape] if args.layers is None else Shape(**{**asdict(SHAPES[args.shape]), "layers": args.layers})
    )
    started = time.perf_counter()
    model_dir = write_model(args.work_dir, shape, device="cuda" if args.device == "cuda" else "cpu")
    if not (model_dir / "tokenizer.json").exists():
        if args.tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (args.tokenizer / name).exists():
                    shutil.copyfile(args.tokenizer / name, model_dir / name)
        else:
            write_tokenizer(model_dir)
    ckpts = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    settings = [(int(s), ckpt) for s in args.seq.split(",") for ckpt in ckpts]
    out = args.out or (Path(os.environ["OUT"]) / "plan_check.json" if os.environ.get("OUT") else
                       ROOT / "bench" / "results" / "plan_check.json")  # fmt: skip
    cli = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"shape": asdict(shape), "environment": environment(), "settings": cli, "results": []}

    def save(results: list[dict]) -> None:
        payload["results"], payload["total_s"] = results, round(time.perf_counter() - started, 1)
        write_json(out, payload)

    save([])
    budget = None if args.budget is None else args.budget - (time.perf_counter() - started)
    results = run_settings(model_dir, settings, dtype=args.dtype, device=args.device, steps=args.steps,
                           optimizer=args.optimizer, parallel=args.parallel, timeout=args.timeout, budget=budget,
                           on_result=save, raise_on_error=False)  # fmt: skip
    save(results)
    print(table(results), flush=True)
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
