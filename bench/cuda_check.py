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
import math
import os
import sys
import tempfile
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

from finetune.moe.quantized import ExpertLoraFactors, QuantizedExperts  # noqa: E402

# Small Mixtral-like expert stacks: real dims would only make the CPU reference slow; every size is a multiple of the
# 64-element block like Mixtral's, and the forward covers an expert that receives no token.
HIDDEN, FFN, EXPERTS, TOKENS, RANK = 256, 512, 4, 48, 4
# Relative (Frobenius) quantisation error bounds for Gaussian weights: the formats' own error (about 0.092 nf4,
# 0.122 fp4, 0.008 int8, measured on CPU) plus a third; exceeding them means wrong codes, not rounding.
ERROR_BOUND = {"nf4": 0.12, "fp4": 0.16, "int8": 0.015, "none": 1e-6}
DEVICE_VS_CPU_BOUND = 1e-2  # device codes against the CPU reference's: ties may round differently, nothing more
BF16_BOUND = 0.05  # bf16 autocast against float32 on the same weights (bf16 has 8 significant bits)
QUANTIZE_CASES = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int8", False), ("none", False)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius), in float32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded bf16 expert weights, std 0.02 like Mixtral's init, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return {
        "gate_up_proj": (torch.randn(EXPERTS, 2 * FFN, HIDDEN, generator=g) * 0.02).bfloat16(),
        "down_proj": (torch.randn(EXPERTS, HIDDEN, FFN, generator=g) * 0.02).bfloat16(),
    }


def experts(quantization: str, double_quant: bool, device: torch.device, w: dict[str, torch.Tensor]):
    module = QuantizedExperts(
        EXPERTS, HIDDEN, FFN, quantization=quantization, double_quant=double_quant, dtype=torch.bfloat16, device=device
    )
    for proj, stacked in w.items():
        module.load_stacked(proj, stacked)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- items


def quantize_item(quantization: str, double_quant: bool):
    def item(device: torch.device) -> dict[str, Any]:
        w = weights()
        reference = experts(quantization, double_quant, torch.device("cpu"), w)
        module = reference if device.type == "cpu" else experts(quantization, double_quant, device, w)
        sync(device)
        out: dict[str, Any] = {"quantization": quantization, "double_quant": double_quant}
        ok = True
        for proj, stacked in w.items():
            got = module.dequantized_stack(proj, torch.float32)
            error = rel(got, stacked)
            out[f"{proj}_error_vs_weights"] = error
            ok &= error <= ERROR_BOUND[quantization]
            if device.type != "cpu":
                vs_cpu = rel(got, reference.dequantized_stack(proj, torch.float32))
                data = "weight" if quantization == "none" else "data"
                codes = module._storage(proj, data).cpu().view(-1)
                ref_codes = reference._storage(proj, data).view(-1)
                out[f"{proj}_vs_cpu_reference"] = vs_cpu
                out[f"{proj}_codes_differing"] = (codes != ref_codes).float().mean().item()
                ok &= vs_cpu <= DEVICE_VS_CPU_BOUND
        out["bounds"] = {"error_vs_weights": ERROR_BOUND[quantization], "vs_cpu_reference": DEVICE_VS_CPU_BOUND}
        if device.type == "cpu":
            out["note"] = "on CPU the device is the reference: only the error against the weights is checked"
        out["ok"] = bool(ok)
        return out

    return item


def routed_inputs(device: torch.device, seed: int = 1):
    """Tokens, top-2 routing that leaves the last expert empty, softmax weights, and LoRA factors (PEFT layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    logits = torch.randn(TOKENS, EXPERTS, generator=g)
    logits[:, -1] = -1e9  # one expert with no tokens: the forward must skip it
    top_w, top_i = torch.softmax(logits, dim=-1).topk(2, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    lora = {}
    for proj, (rows, cols) in {"gate_up_proj": (2 * FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}.items():
        a = torch.randn(EXPERTS * RANK, cols, generator=g) / math.sqrt(cols)
        b = torch.randn(rows, RANK * EXPERTS, generator=g) * 0.1
        lora[proj] = (a.to(device).requires_grad_(), b.to(device).requires_grad_())
    return x.to(device), top_i.to(device), top_w.to(device), lora


def dense_reference(x, top_i, top_w, stacks, lora, scaling: float):
    """The same MoE in float32 with whole dequantised weights, expert by expert with masks: what the routed, sorted,
    dequantise-one-at-a-time forward must equal."""
    out = torch.zeros_like(x)
    for e in range(EXPERTS):
        w_token = (top_w * (top_i == e)).sum(dim=-1, keepdim=True)  # 0 for tokens not routed to e
        ga, gb = lora["gate_up_proj"]
        da, db = lora["down_proj"]
        a_gu, b_gu = ga.view(EXPERTS, RANK, -1)[e], gb.view(gb.shape[0], RANK, EXPERTS)[:, :, e]
        a_d, b_d = da.view(EXPERTS, RANK, -1)[e], db.view(db.shape[0], RANK, EXPERTS)[:, :, e]
        gate_up = x @ stacks["gate_up_proj"][e].t() + (x @ a_gu.t()) @ b_gu.t() * scaling
        gate, up = gate_up.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        y = h @ stacks["down_proj"][e].t() + (h @ a_d.t()) @ b_d.t() * scaling
        out = out + y * w_token
    return out


def forward_backward_item(quantization: str):
    def item(device: torch.device) -> dict[str, Any]:
        module = experts(quantization, quantization in ("nf4", "fp4"), device, weights())
        scaling = 2.0
        x, top_i, top_w, lora = routed_inputs(device)
        x.requires_grad_()
        factors = {p: ExpertLoraFactors(a, b, scaling, EXPERTS) for p, (a, b) in lora.items()}
        g = torch.Generator().manual_seed(2)
        upstream = torch.randn(TOKENS, HIDDEN, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = module(x, top_i, top_w, expert_lora=factors)
        (y.float() * upstream).sum().backward()
        got = {"output": y.detach(), "x_grad": x.grad}
        got.update({f"{p}_lora_{n}_grad": t.grad for p, ab in lora.items() for n, t in zip("AB", ab, strict=True)})

        stacks = {p: module.dequantized_stack(p, torch.float32) for p in ("gate_up_proj", "down_proj")}
        x_ref = x.detach().float().clone().requires_grad_()
        lora_ref = {p: tuple(t.detach().clone().requires_grad_() for t in ab) for p, ab in lora.items()}
        y_ref = dense_reference(x_ref, top_i, top_w, stacks, lora_ref, scaling)
        (y_ref * upstream).sum().backward()
        want = {"output": y_ref.detach(), "x_grad": x_ref.grad}
        want.update({f"{p}_lora_{n}_grad": t.grad for p, ab in lora_ref.items() for n, t in zip("AB", ab, strict=True)})

        out: dict[str, Any] = {"quantization": quantization, "autocast": "bfloat16", "output_dtype": str(y.dtype)}
        ok = True
        for key, reference in want.items():
            if got[key] is None:
                out[key] = None
                ok = False
                out.setdefault("reason", f"{key} is missing: no gradient reached it")
                continue
            error = rel(got[key], reference)
            out[key] = error
            ok &= math.isfinite(error) and error <= BF16_BOUND
        out["bound"] = BF16_BOUND
        out["ok"] = bool(ok)
        return out

    return item


def staging_item(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"ok": None, "reason": "needs CUDA: moves CPU-quantised experts to the GPU and dequantises them there"}
    out: dict[str, Any] = {}
    ok = True
    for quantization, double_quant in (("nf4", True), ("fp4", False)):
        staged = experts(quantization, double_quant, torch.device("cpu"), weights())
        reference = {p: staged.dequantized_stack(p, torch.float32) for p in ("gate_up_proj", "down_proj")}
        staged.to(device)
        kinds = {p.device.type for p in staged.parameters()}
        for proj, ref in reference.items():
            got = staged.dequantized_stack(proj, torch.float32)
            diff = (got.cpu() - ref).abs().max().item()
            out[f"{quantization}_dq{int(double_quant)}_{proj}_max_abs_diff"] = diff
            ok &= got.device.type == "cuda" and diff <= 1e-5 * ref.abs().max().item()  # float32 rounding at most
        ok &= kinds == {"cuda"}
    out["ok"] = bool(ok)
    return out


def paged_adamw_item(device: torch.device) -> dict[str, Any]:
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(3)
    start = torch.randn(128, 64, generator=g)  # 8192 elements: above bitsandbytes' 4096 minimum for 8-bit state
    grad = torch.randn(128, 64, generator=g)
    lr = 1e-3
    results = {}
    for name, cls in (("bnb", bnb.optim.PagedAdamW8bit), ("torch", torch.optim.AdamW)):
        p = torch.nn.Parameter(start.clone().to(device))
        p.grad = grad.clone().to(device)
        opt = cls([p], lr=lr, weight_decay=0.0)
        opt.step()
        sync(device)
        results[name] = (p.detach().float().cpu() - start, opt)
    update, reference = results["bnb"][0], results["torch"][0]
    state = results["bnb"][1].state[next(iter(results["bnb"][1].state))]
    cosine = torch.nn.functional.cosine_similarity(update.view(-1), reference.view(-1), dim=0).item()
    out = {
        "update_vs_adamw": rel(update, reference),
        "cosine_vs_adamw": cosine,
        "state_dtype": str(state["state1"].dtype),
        "paged": device.type == "cuda",
    }
    if device.type != "cuda":
        out["note"] = "bitsandbytes pages optimizer state only on CUDA; on CPU the same step runs unpaged"
    out["ok"] = bool(torch.isfinite(update).all().item() and cosine > 0.99 and state["state1"].dtype == torch.uint8)
    return out


class _Holder(torch.nn.Module):
    """A float projection feeding quantised experts: one FSDP2 unit holding both kinds of parameter."""

    def __init__(self, module: QuantizedExperts, device: torch.device):
        super().__init__()
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN, device=device)
        self.experts = module

    def forward(self, x, top_i, top_w):
        return self.experts(self.proj(x), top_i, top_w)


class _FsdpState:
    """The FSDP2 model the two FSDP items share (the optimizer item steps the first one's DTensor parameters)."""

    holder: _Holder | None = None


def init_one_rank(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = Path(tempfile.mkdtemp(prefix="cuda-check-pg-")) / "store"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def fully_shard_item(device: torch.device) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    init_one_rank(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out: dict[str, Any] = {"backend": "nccl" if device.type == "cuda" else "gloo"}
    ok = True
    for quantization, double_quant in (("nf4", True), ("nf4", False), ("fp4", True)):
        tag = f"{quantization}_dq{int(double_quant)}"
        module = experts(quantization, double_quant, device, weights())
        before = {p: module.dequantized_stack(p, torch.float32) for p in ("gate_up_proj", "down_proj")}
        holder = _Holder(module, device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(holder, mp_policy=policy)
        seen: dict[str, Any] = {}

        def look(mod, args, seen=seen, before=before):  # inside the gathered forward: what compute sees
            seen["storage_dtypes"] = sorted({str(p.dtype) for p in mod.parameters()})
            seen["diff"] = max(
                (mod.dequantized_stack(p, torch.float32) - ref).abs().max().item() for p, ref in before.items()
            )

        handle = module.register_forward_pre_hook(look)
        x, top_i, top_w, _ = routed_inputs(device)
        y = holder(x.requires_grad_(), top_i, top_w)
        y.float().square().mean().backward()
        handle.remove()
        sharded = all(isinstance(p, DTensor) for p in holder.parameters())
        out[f"{tag}_dequantized_max_abs_diff"] = seen.get("diff")
        out[f"{tag}_storage_dtypes_in_forward"] = seen.get("storage_dtypes")
        out[f"{tag}_output_dtype"] = str(y.dtype)
        grad = holder.proj.weight.grad
        grad_ok = grad is not None and bool(torch.isfinite(grad.full_tensor()).all().item())
        ok &= sharded and seen.get("diff") == 0.0 and grad_ok and y.dtype == torch.bfloat16
        _FsdpState.holder = holder
    out["ok"] = bool(ok)
    return out


def fsdp_refuses_bnb_optimizer() -> str | None:
    """finetune's own refusal of FSDP2 with a bitsandbytes optimizer, as `finetune run` gives it before loading."""
    from unittest import mock

    from finetune.distributed.sharding import launch_problems
    from finetune.recipe.schema import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "tiny-mixtral-sft.yaml", ["training.optimizer=paged_adamw_8bit"])
    with mock.patch.dict(os.environ, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}):
        problems = launch_problems(recipe)
    return next((p for p in problems if "training.optimizer" in p), None)


def paged_adamw_fsdp2_item(device: torch.device) -> dict[str, Any]:
    """FSDP2 with a bitsandbytes optimizer either works or is refused before loading: this steps one on FSDP2's
    DTensor parameters, and where it cannot, checks that finetune refuses the combination."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    holder = _FsdpState.holder
    if holder is None:
        return {"ok": None, "reason": "needs the FSDP2 model of fully_shard_bf16, which did not get that far"}
    params = [p for p in holder.proj.parameters() if p.grad is not None]
    out: dict[str, Any] = {
        "param_types": sorted({type(p).__name__ for p in params}),
        "note": "one rank: a DTensor's local shape equals its global shape, so state sized from the global shape "
        "cannot show here; this checks whether the step runs on DTensors at all",
    }
    before = [p.full_tensor().detach().float().clone() for p in params]
    try:
        bnb.optim.PagedAdamW8bit(params, lr=1e-3).step()
        sync(device)
        after = [p.full_tensor().detach().float() for p in params]
        out["step"] = "ran"
        out["moved"] = all(bool((a != b).any().item()) for a, b in zip(after, before, strict=True))
        out["finite"] = all(bool(torch.isfinite(a).all().item()) for a in after)
        works = out["moved"] and out["finite"] and all(isinstance(p, DTensor) for p in params)
    except Exception as exc:
        out["step"] = f"{type(exc).__name__}: {exc}"[:500]
        works = False
    if works:
        out["ok"] = True
        return out
    refusal = fsdp_refuses_bnb_optimizer()
    out["finetune_refuses_before_loading"] = refusal
    out["ok"] = refusal is not None
    if refusal is None:
        out["reason"] = "the step fails on DTensors and finetune does not refuse FSDP2 with paged_adamw_8bit"
    return out


def trl_sft_step_item(device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist

    if dist.is_initialized():  # the FSDP items' group: the run must see a plain single process
        dist.destroy_process_group()
    _FsdpState.holder = None
    from finetune.recipe.schema import load_recipe
    from finetune.train.run import run

    out_dir = Path(tempfile.mkdtemp(prefix="cuda-check-sft-"))
    overrides = [
        f"output_dir={out_dir}",
        f"model.device={device.type}",
        "training.max_steps=1",
        "training.logging_steps=1",
        "data.eval_fraction=0",
        "tracking.sample_prompts=0",
    ]
    recipe = load_recipe(ROOT / "recipes" / "tiny-mixtral-sft.yaml", overrides)
    metrics = run(recipe, overwrite=True)
    loss = metrics.get("first_loss")
    adapter = out_dir / "adapter" / "adapter_model.safetensors"
    return {
        "first_loss": loss,
        "device": metrics.get("device"),
        "dtype": metrics.get("dtype"),
        "adapter_written": adapter.exists(),
        "output_dir": str(out_dir),
        "ok": bool(loss is not None and math.isfinite(loss) and adapter.exists()),
    }


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
    for name, fn in ITEMS:
        if wanted and name not in wanted:
            continue
        record = run_item(name, fn, device)
        payload["items"].append(record)
        write_json(out, payload)
        status = {True: "ok", False: "FAILED", None: "n/a"}[record["ok"]]
        detail = f": {record['reason'][:160]}" if record["ok"] is not True else ""
        print(f"cuda_check {name}: {status} ({record['seconds']:.1f}s){detail}", flush=True)
    failed = [r["name"] for r in payload["items"] if r["ok"] is False]
    print(f"cuda_check: {len(payload['items']) - len(failed)} of {len(payload['items'])} not failed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
