"""QLoRA on a Mixtral-shaped model: our NF4 experts against two stock bitsandbytes + PEFT baselines, in one run.

Variants (each loads in a fresh subprocess so peak-memory readings don't mix):
  ours           finetune.moe load_mixtral(quantization="nf4") + apply_lora (attention + both expert projections)
  stock          (a) from_pretrained(BitsAndBytesConfig 4-bit) + PEFT target_parameters; bnb only replaces
                 nn.Linear, so the experts silently stay 16-bit (bitsandbytes #1849)
  dequant        (b) stock load, then bitsandbytes' replace_parameter_4bit on every expert parameter, + PEFT
                 target_parameters made to work (see `apply_peft_dequant` in variants.py)
  dequant-naive  (b) with the obvious PEFT config, applied (and unloaded again) inside the dequant run: it
                 attaches no expert LoRA, so it is counted and refused, never timed

Every variant's trainable expert-LoRA parameters are counted before anything is timed, and the warm-up step checks
that they actually receive gradients. A variant with none is refused, with the reason printed.

    python bench/bench_moe.py                  # CPU, Mixtral-shaped 4 layers, bf16: ~9 min on 2 busy cores
    python bench/bench_moe.py --quick --out /tmp/x.json   # tiny smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fmt_bytes, fmt_rate, fmt_ratio, markdown_table, write_json
from variants import (
    apply_variant_lora,
    count_trainable,
    expert_lora_with_grad,
    expert_wide_params,
    load_variant,
    preimport,
    resident_bytes,
    sync_device,
)

VARIANTS = ["ours", "stock", "dequant"]
LABELS = {
    "ours": "ours: NF4 experts + expert LoRA",
    "stock": "(a) stock bnb 4-bit + PEFT",
    "dequant": "(b) bnb parametrize + PEFT (fixed)",
    "dequant-naive": "(b) bnb parametrize + PEFT (naive)",
}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_moe.json"


@dataclass(frozen=True)
class Shape:
    hidden: int = 1024
    ffn: int = 3584
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000

    def config(self):
        from finetune.model.tiny import TinySpec, mixtral_config

        dims = TinySpec(
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            layers=self.layers,
            experts=self.experts,
            top_k=self.top_k,
            heads=self.heads,
            kv_heads=self.kv_heads,
            max_position_embeddings=8192,
            initializer_range=0.02,  # Mixtral's own
        )
        return mixtral_config(dims, vocab_size=self.vocab)

    def active_params_per_token(self) -> int:
        """Matmul weights one token passes through: attention, router, top-k experts, lm_head (no embedding)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.heads * head_dim + 2 * self.hidden * self.kv_heads * head_dim
        experts = self.top_k * 3 * self.hidden * self.ffn
        return self.layers * (attention + self.hidden * self.experts + experts) + self.hidden * self.vocab


QUICK_SHAPE = Shape(hidden=64, ffn=128, layers=2, experts=8, top_k=2, heads=4, kv_heads=2, vocab=2048)


# --------------------------------------------------------------------------------------------- checkpoint


def write_model(
    work_dir: str | Path, shape: Shape, *, device: str = "cpu", seed: int = 0, max_shard_size: str = "200MB"
) -> Path:
    """Write a seeded random bf16 Mixtral in several safetensors shards once; reuse it when the shape matches."""
    from transformers import MixtralForCausalLM

    target = Path(work_dir) / ("mixtral-" + "-".join(f"{k}{v}" for k, v in asdict(shape).items()))
    if (target / "shape.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = MixtralForCausalLM(shape.config()).to(torch.bfloat16)
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    del model
    (tmp / "shape.json").write_text(json.dumps(asdict(shape)) + "\n")
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------- measuring


def run_variant(variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load, count, train and measure one variant in this process (called in a fresh subprocess).

    Returns its result rows: the dequant variant first adds a row for the naive PEFT config on the same model.
    """
    from finetune.memory import PeakMemory

    device, dtype = args.device, getattr(torch, args.dtype)
    result: dict[str, Any] = {"variant": variant, "label": LABELS[variant], "status": "ok"}
    preimport(variant)  # so the load peak is the load's, not the imports'
    gc.collect()
    with PeakMemory(device) as load_mem:
        t0 = time.perf_counter()
        model, extra = load_variant(variant, Path(args.model_dir), device, dtype)
        sync_device(device)
        result["load_s"] = time.perf_counter() - t0
    result.update(extra)
    result["resident_bytes"] = resident_bytes(model)
    result["load_peak_above_start_bytes"] = load_mem.delta
    result["load_peak_bytes"] = load_mem.peak
    result["expert_params_16_32bit"] = expert_wide_params(model)
    rows = [result]
    if variant == "dequant":  # the trap, measured on this very model, then undone
        naive = apply_variant_lora("dequant-naive", model, args.r, args.alpha)
        counts = {f"trainable_{k}": v for k, v in count_trainable(naive).items()}
        rows.insert(0, {**result, **counts, "variant": "dequant-naive", "label": LABELS["dequant-naive"]})
        print(f"[dequant-naive] trainable: {counts}", flush=True)
        if counts["trainable_expert_lora"] == 0:
            rows[0]["status"] = "refused"
            rows[0]["reason"] = "0 trainable expert-LoRA parameters: PEFT matched no parametrized expert weight"
            print(f"[dequant-naive] REFUSED to time: {rows[0]['reason']}", flush=True)
        model = naive.unload()

    model = apply_variant_lora(variant, model, args.r, args.alpha)
    trainable = count_trainable(model)
    result.update({f"trainable_{k}": v for k, v in trainable.items()})
    print(f"[{variant}] trainable: {trainable}", flush=True)
    if trainable["expert_lora"] == 0:
        result["status"] = "refused"
        result["reason"] = "0 trainable expert-LoRA parameters: the expert weights would not be fine-tuned"
        print(f"[{variant}] REFUSED to time: {result['reason']}", flush=True)
        return rows

    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=generator) for _ in range(args.steps + 1)]
    losses, step_s = [], []
    with PeakMemory(device) as train_mem:
        for i, ids in enumerate(batches):
            ids = ids.to(device)
            sync_device(device)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            if i == 0:
                result["expert_lora_with_grad"] = expert_lora_with_grad(model)
                if result["expert_lora_with_grad"] == 0:
                    result["status"] = "refused"
                    result["reason"] = "expert-LoRA parameters exist but none received a gradient"
                    print(f"[{variant}] REFUSED to time: {result['reason']}", flush=True)
                    return rows
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync_device(device)
            step_s.append(time.perf_counter() - t0)
            losses.append(loss.item())
            print(
                f"[{variant}] step {i} {'(warm-up) ' if i == 0 else ''}{step_s[-1]:.2f}s loss {losses[-1]:.4f}",
                flush=True,
            )
    timed = step_s[1:]
    result["step_s"] = step_s
    result["losses"] = losses
    result["tokens_per_s"] = args.batch * args.seq * len(timed) / sum(timed)
    result["train_peak_above_resident_bytes"] = train_mem.delta
    result["train_peak_bytes"] = train_mem.peak
    return rows


def child_main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    try:
        rows = run_variant(args.child, args)
    except Exception as exc:  # the parent reports it next to the other variants
        traceback.print_exc()
        rows = [{"variant": args.child, "label": LABELS[args.child], "status": "error", "reason": repr(exc)[:500]}]
    if torch.device(args.device).type == "cpu":
        rows[-1]["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.result).write_text(json.dumps(rows) + "\n")


# --------------------------------------------------------------------------------------------- parent


def spawn_variant(variant: str, model_dir: Path, args: argparse.Namespace, timeout_s: float) -> list[dict[str, Any]]:
    """Run one variant in a fresh interpreter; a crash or timeout becomes an error row, not a lost run."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model-dir", str(model_dir)]
        cmd += ["--result", str(result_path), "--device", args.device, "--dtype", args.dtype]
        cmd += ["--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps)]
        cmd += ["--r", str(args.r), "--alpha", str(args.alpha)] + (["--grad-ckpt"] if args.grad_ckpt else [])
        print(f"== {variant}: {LABELS[variant]}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return [
                {"variant": variant, "label": LABELS[variant], "status": "error", "reason": f"timeout {timeout_s}s"}
            ]
        if result_path.exists():
            rows = json.loads(result_path.read_text())
        else:
            rows = [
                {"variant": variant, "label": LABELS[variant], "status": "error", "reason": f"exit {proc.returncode}"}
            ]
        if rows[-1]["status"] == "error":
            print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        rows[-1]["wall_s"] = time.perf_counter() - t0
        return rows


def render_table(results: list[dict[str, Any]]) -> str:
    ours = next((r for r in results if r["variant"] == "ours" and r["status"] == "ok"), {})
    rows = []
    for r in results:
        if r["status"] == "error":
            rows.append([r["label"], f"error: {r.get('reason', '')[:80]}"] + [""] * 6)
            continue
        expert = f"{r.get('trainable_expert_lora', 0):,}"
        if r.get("expert_lora_with_grad") is not None and r["expert_lora_with_grad"] != r["trainable_expert_lora"]:
            expert += f" ({r['expert_lora_with_grad']:,} get grad)"
        tps = r.get("tokens_per_s")
        rows.append([
            r["label"],
            fmt_bytes(r.get("resident_bytes")) + fmt_ratio(r.get("resident_bytes"), ours.get("resident_bytes")),
            fmt_bytes(r.get("load_peak_above_start_bytes"))
            + fmt_ratio(r.get("load_peak_above_start_bytes"), ours.get("load_peak_above_start_bytes")),
            f"{r.get('expert_params_16_32bit', 0):,}",
            f"{r.get('trainable_attention_lora', 0):,}",
            expert,
            (fmt_rate(tps) + fmt_ratio(tps, ours.get("tokens_per_s"))) if tps else f"not timed: {r.get('reason', '')}",
            fmt_bytes(r.get("train_peak_above_resident_bytes"))
            + fmt_ratio(r.get("train_peak_above_resident_bytes"), ours.get("train_peak_above_resident_bytes")),
        ])  # fmt: skip
    header = [
        "variant", "base resident", "load peak (above start)", "expert params kept 16/32-bit",
        "attn LoRA", "expert LoRA", "train tokens/s", "train peak above resident",
    ]  # fmt: skip
    return markdown_table(header, rows) + "\n\nRatios in parentheses are against ours."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = Shape()
    for field in ("hidden", "ffn", "layers", "experts", "top_k", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(shape, field))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="compute dtype")
    p.add_argument("--seq", type=int, default=64, help="sequence length (CPU default; bf16 on CPU is slow)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps (one warm-up step is extra)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing during training")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "finetune-bench-moe"))
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    p.add_argument("--jobs", type=int, default=1, help="variants run at once (timings then share the CPU)")
    p.add_argument("--quick", action="store_true", help="tiny dims and steps, variants at once: a smoke run")
    p.add_argument("--out", default=str(DEFAULT_RESULTS))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for field, value in asdict(QUICK_SHAPE).items():
            setattr(args, field, value)
        args.seq, args.steps, args.jobs = 32, 1, len(VARIANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    shape = Shape(**{f: getattr(args, f) for f in asdict(Shape())})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    t0 = time.perf_counter()
    model_dir = write_model(args.work_dir, shape)
    print(f"model: {model_dir} ({time.perf_counter() - t0:.1f}s)", flush=True)
    # --jobs > 1 (the --quick default) runs the subprocesses side by side: each still measures its own memory, but
    # they share the CPU, so their timings are only a smoke signal
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        per_variant = list(pool.map(lambda v: spawn_variant(v, model_dir, args, args.timeout), variants))
    results = [row for rows in per_variant for row in rows]
    table = render_table(results)
    print("\n" + table, flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "model_dir", "result")}
    payload = {"shape": asdict(shape), "settings": settings, "environment": environment(), "results": results}
    print(f"\nwrote {write_json(args.out, payload)}", flush=True)
    return 0 if all(r["status"] != "error" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
