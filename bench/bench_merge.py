"""Merge benchmark: `finetune merge` (streaming, shard by shard) against PEFT's `merge_and_unload()` on the whole
model loaded in memory, on the same Mixtral-shaped checkpoint, in one run.

Each side runs in its own process; peak memory is that process's VmHWM above its level after imports. Both merged
outputs are checked against each other (same tensors to bf16 precision), so the faster one is not wrong.

    python bench/bench_merge.py                  # hidden 1024, ffn 3584, 4 layers, 8 experts, bf16, 4 shards
    python bench/bench_merge.py --layers 2 --out bench/results/bench_merge.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment, fmt_bytes, markdown_table, write_json

MEASURE = """
import json, sys, time
from pathlib import Path
import psutil

def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

side, base, adapter, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
import torch
from transformers import MixtralForCausalLM
from peft import PeftModel
from finetune.export.merge import merge_shards
start, t0 = psutil.Process().memory_info().rss, time.perf_counter()
if side == "ours":
    out.mkdir()
    merge_shards(base, adapter, out)
else:
    model = MixtralForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(out), max_shard_size="200MB")
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_above_start": hwm() - start}))
"""


def build(root: Path, layers: int) -> tuple[Path, Path]:
    from finetune.model.tiny import TinySpec, mixtral_config
    from finetune.moe import apply_lora, load_mixtral, save_adapter
    from tests.conftest import random_lora_, write_raw_mixtral

    spec = TinySpec(hidden_size=1024, intermediate_size=3584, layers=layers, heads=8, kv_heads=2)
    base = write_raw_mixtral(root / "base", mixtral_config(spec), dtype=torch.bfloat16, shards=layers * 2)
    model, _ = load_mixtral(base, quantization="nf4", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=8, expert_alpha=16)  # fmt: skip
    random_lora_(model, seed=0, std=0.02)
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


def run_side(side: str, base: Path, adapter: Path, out: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, side, str(base), str(adapter), str(out)],
        cwd=root, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_difference(ours: Path, stock: Path) -> float:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                found.update({k: (shard, k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        return found

    a, b = tensors(ours), tensors(stock)
    worst = 0.0
    for name, (shard, key) in a.items():
        if name not in b:  # stock saves v5's fused expert names; compare the tensors both write under one name
            continue
        with safe_open(str(shard), framework="pt") as f, safe_open(str(b[name][0]), framework="pt") as g:
            x, y = f.get_tensor(key).float(), g.get_tensor(key).float()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_merge.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = build(root, args.layers)
        checkpoint = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
        results = {side: run_side(side, base, adapter, root / side) for side in ("ours", "peft_merge_and_unload")}
        results["ours_vs_stock_max_relative_difference"] = max_difference(root / "ours", root / "peft_merge_and_unload")
    ours, stock = results["ours"], results["peft_merge_and_unload"]
    rows = [
        ["finetune merge (streaming)", fmt_bytes(ours["peak_above_start"]), f"{ours['seconds']:.1f} s"],
        ["PEFT merge_and_unload (whole model)", fmt_bytes(stock["peak_above_start"]), f"{stock['seconds']:.1f} s"],
    ]
    print(f"checkpoint {fmt_bytes(checkpoint)} bf16 in shards of at most {fmt_bytes(largest)}, {args.layers} layers")
    print(markdown_table(["merge", "peak memory above start", "wall time"], rows))
    ratio = stock["peak_above_start"] / max(ours["peak_above_start"], 1)
    print(
        f"memory ratio (PEFT / ours): {ratio:.1f}x; tensors agree to {results['ours_vs_stock_max_relative_difference']:.1e}"
    )
    payload = {
        "command": "python bench/bench_merge.py " + " ".join(sys.argv[1:]),
        "shape": {"hidden": 1024, "ffn": 3584, "layers": args.layers, "experts": 8, "dtype": "bfloat16"},
        "checkpoint_bytes": checkpoint,
        "largest_shard_bytes": largest,
        "results": results,
        "memory_ratio_stock_over_ours": ratio,
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "environment": environment(),
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
