"""CUDA self-check: each piece of the GPU path that no CPU test can cover, checked on its own in about a minute.

Items (each one an object in the JSON, written after every item, so a crash or a kill keeps what was done):
  quantize_*          QuantizedExperts quantised on the device against bitsandbytes' CPU reference (nf4 and fp4 with
                      double quantisation on/off, int8, none), and the quantisation error against the weights
  forward_backward_*  the routed forward and backward under bf16 autocast, LoRA gradients included, against a dense
                      float32 reference on the same dequantised weights
  staging             quantised on CPU, moved to CUDA, dequantised there (how FSDP2 stages experts on GPUs)
  paged_adamw_8bit    one bitsandbytes PagedAdamW8bit step against torch's AdamW
  fully_shard_bf16    FSDP2 `fully_shard` with a bf16 MixedPrecisionPolicy on one rank: the dequantised experts in
                      the gathered forward are bit-identical to the unsharded ones; forward and backward run
  paged_adamw_8bit_fsdp2  the same optimizer step on FSDP2's DTensor parameters (one rank)
  trl_sft_step        one TRL SFT step of recipes/tiny-mixtral-sft.yaml through finetune's run path

Each item has `name`, `ok` (true, false, or null where it cannot run on this device, with a `reason`), `seconds`, its
figures, and on failure `reason` and `traceback`. A failing item never stops the next one.

    python bench/cuda_check.py                 # on the GPU machine
    python bench/cuda_check.py --cpu           # the same items on CPU (what the test suite runs)
Writes --out, else $OUT/cuda_check.json when OUT is set, else bench/results/cuda_check[_cpu].json.
Exit status: 0 when no item is false, 1 otherwise, 2 without CUDA and without --cpu.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune import quiet  # noqa: E402  (before bitsandbytes: it logs at import)

quiet.install()

import torch  # noqa: E402
from cuda_items import (  # noqa: E402
    QUANTIZE_CASES,
    Scratch,
    forward_backward_item,
    paged_adamw_item,
    quantize_item,
    staging_item,
)
from cuda_items_fsdp import fully_shard_item, paged_adamw_fsdp2_item, trl_sft_step_item  # noqa: E402

ITEMS = [
    *[(f"quantize_{q}{'_dq' if dq else ''}", quantize_item(q, dq)) for q, dq in QUANTIZE_CASES],
    *[(f"forward_backward_{q}", forward_backward_item(q)) for q in ("nf4", "int8", "none")],
    ("staging_cpu_quantize_cuda_dequantize", staging_item),
    ("paged_adamw_8bit", paged_adamw_item),
    ("fully_shard_bf16", fully_shard_item),
    ("paged_adamw_8bit_fsdp2", paged_adamw_fsdp2_item),
    ("trl_sft_step", trl_sft_step_item),
]


# --------------------------------------------------------------------------------------------- running


def run_item(name: str, fn, device: torch.device) -> dict[str, Any]:
    """One item, never raising: its figures, or ok false with the error and its traceback."""
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(device)
        except Exception as exc:
            result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()}
    messages = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
    if any("silently incorrect" in m for m in messages):  # PyTorch's wrong-gradient warning is a failure, not noise
        result["ok"] = False
        result.setdefault("reason", "PyTorch warned of silently incorrect gradients")
    if result.get("ok") is not True and "reason" not in result:
        result["reason"] = "a figure is outside its bound (see the figures)"
    record = {"name": name, "ok": result.pop("ok"), "seconds": round(time.perf_counter() - started, 3), **result}
    if messages:
        record["warnings"] = messages[:8]
    return record


def default_out(cpu: bool) -> Path:
    name = "cuda_check_cpu.json" if cpu else "cuda_check.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "bench" / "results" / name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run every item on CPU (those that need CUDA say so)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--only", default="", help="comma-separated item names (default: all)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; run with --cpu for the CPU path", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import environment, write_json

    device = torch.device("cpu" if args.cpu else "cuda:0")
    out = args.out or default_out(args.cpu)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {name for name, _ in ITEMS}
    if unknown:
        print(f"cuda_check: unknown items {sorted(unknown)}; known: {[n for n, _ in ITEMS]}", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {"device": str(device), "environment": environment(), "items": []}
    if device.type == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(device)
    try:
        for name, fn in ITEMS:
            if wanted and name not in wanted:
                continue
            record = run_item(name, fn, device)
            payload["items"].append(record)
            write_json(out, payload)
            status = {True: "ok", False: "FAILED", None: "n/a"}[record["ok"]]
            detail = f": {record['reason'][:160]}" if record["ok"] is not True else ""
            print(f"cuda_check {name}: {status} ({record['seconds']:.1f}s){detail}", flush=True)
    finally:
        Scratch.remove()
    failed = [r["name"] for r in payload["items"] if r["ok"] is False]
    print(f"cuda_check: {len(payload['items']) - len(failed)} of {len(payload['items'])} not failed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
