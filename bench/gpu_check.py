"""GPU check: QLoRA training at Mixtral-8x7B's real layer dimensions (2 layers), ours against the stock baselines.

Builds a 2-layer Mixtral with hidden 4096, ffn 14336, 8 experts top-2, 32/8 heads, vocab 32000 from random weights
created on the GPU, writes it once as a bf16 checkpoint under /tmp (about 3.2B parameters, 6.3 GB), then trains each
variant in its own subprocess at sequence length 4096 (batch 1, gradient checkpointing, bf16):
  ours     finetune.moe load_mixtral(nf4) + apply_lora (attention + expert LoRA)
  stock    (a) from_pretrained(BitsAndBytesConfig 4-bit) + PEFT target_parameters; experts stay bf16
  dequant  (b) (a) + bitsandbytes replace_parameter_4bit on the experts + PEFT made to match (see variants.py)

MFU = tokens/s * 4 * active params per token / peak bf16 FLOP/s (the GPU's entry in finetune's GPU table). Active
params per token: per layer the attention projections, the router and top-k experts' three projections, plus lm_head;
the embedding (a lookup) is excluded, and so are attention-score FLOPs and the gradient-checkpointing recompute (so MFU understates the hardware's work).
4 = 2 (forward) + 2 (backward through frozen weights to the inputs); LoRA's own FLOPs are negligible.

    python bench/gpu_check.py                 # on the GPU machine; under five minutes
    python bench/gpu_check.py --cpu-smoke     # the same code path on CPU with tiny dims
Writes $OUT/gpu_check.json when OUT is set, else bench/results/gpu_check.json; after every variant, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fmt_bytes, fmt_rate, fmt_ratio, markdown_table, write_json
from bench_moe import LABELS, QUICK_SHAPE, Shape, spawn_variant, write_model
from gpu_env import gpu_peak

REAL_SHAPE = Shape(hidden=4096, ffn=14336, layers=2, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000)
VARIANTS = ["ours", "stock", "dequant"]


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else Path(__file__).resolve().parent / "results" / "gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak (default: the GPU's entry in finetune's GPU table, else 989, H100/H200 SXM)")  # fmt: skip
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (plus one warm-up)")
    p.add_argument("--layers", type=int, default=REAL_SHAPE.layers)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant-timeout", type=float, default=110, help="seconds per variant, load included")
    p.add_argument("--budget", type=float, default=285, help="seconds for the whole check; later variants get less")
    p.add_argument("--work-dir", default="/tmp/finetune-gpu-check")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or bench/results/)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny dims on CPU: checks the code path end to end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device, shape, seq, steps = "cpu", QUICK_SHAPE, 64, 1
    elif torch.cuda.is_available():
        device, shape, seq, steps = "cuda", Shape(**{**asdict(REAL_SHAPE), "layers": args.layers}), args.seq, args.steps
    else:
        print("no CUDA GPU: skipping", flush=True)
        return 0
    started = time.perf_counter()
    table = None
    if device == "cuda":
        table = gpu_peak(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
    if args.peak_tflops is None:
        args.peak_tflops = table["bf16_tflops"] if table else 989.0
    out = args.out or default_out()
    print(f"shape {asdict(shape)}; seq {seq}; device {device}; peak {args.peak_tflops} TFLOP/s ({table})", flush=True)
    model_dir = write_model(args.work_dir, shape, device=device, max_shard_size="2GB")
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"checkpoint {model_dir} ready after {time.perf_counter() - started:.0f}s", flush=True)

    run_args = argparse.Namespace(
        device=device, dtype="bfloat16", seq=seq, batch=1, steps=steps, r=8, alpha=16, grad_ckpt=True
    )
    flops_per_token = 4 * shape.active_params_per_token()
    results = []
    payload = {
        "shape": asdict(shape),
        "settings": {"run": vars(run_args), "cli": vars(args)},
        "active_params_per_token": shape.active_params_per_token(),
        "flops_per_token": flops_per_token,
        "peak_tflops": args.peak_tflops,
        "gpu_table_entry": table,
        "environment": environment(),
        "results": results,
    }
    write_json(out, payload)  # the checkpoint is written: what follows is per variant
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            results.append({"variant": variant, "label": LABELS[variant], "status": "error", "reason": "out of budget"})
            print(f"-- {variant}: skipped, {left:.0f}s of the budget left", flush=True)
            write_json(out, payload)
            continue
        for result in spawn_variant(variant, model_dir, run_args, min(args.variant_timeout, left)):
            if result.get("tokens_per_s"):
                result["mfu"] = result["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
            results.append(result)
            print(f"-- {result['variant']}: {result['status']} at {time.perf_counter() - started:.0f}s", flush=True)
        payload["total_s"] = time.perf_counter() - started
        write_json(out, payload)

    ours = next((r for r in results if r["variant"] == "ours" and r["status"] == "ok"), {})
    rows = []
    for r in results:
        tps = r.get("tokens_per_s")
        rows.append([
            LABELS[r["variant"]],
            r["status"] + (f": {r.get('reason', '')[:80]}" if r["status"] != "ok" else ""),
            fmt_bytes(r.get("resident_bytes")) + fmt_ratio(r.get("resident_bytes"), ours.get("resident_bytes")),
            f"{r.get('trainable_expert_lora', 0):,}",
            (fmt_rate(tps) + fmt_ratio(tps, ours.get("tokens_per_s"))) if tps else "-",
            f"{100 * r['mfu']:.3g}%" if r.get("mfu") else "-",
            fmt_bytes(r.get("train_peak_bytes")) + fmt_ratio(r.get("train_peak_bytes"), ours.get("train_peak_bytes")),
        ])  # fmt: skip
    header = ["variant", "status", "base resident", "expert LoRA", "tokens/s", "MFU", "peak allocated (train)"]
    print("\n" + markdown_table(header, rows), flush=True)
    print(
        f"\nMFU: tokens/s x {flops_per_token / 1e9:.2f} GFLOP/token (4 x {shape.active_params_per_token() / 1e9:.3f}B "
        f"active params, embeddings excluded) / {args.peak_tflops:.0f} TFLOP/s. Ratios against ours.",
        flush=True,
    )
    payload["total_s"] = time.perf_counter() - started
    print(f"wrote {write_json(out, payload)}", flush=True)
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
