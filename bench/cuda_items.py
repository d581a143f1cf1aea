"""The CUDA self-check's items on one expert stack: quantisation against the CPU reference, the routed forward and
backward against a dense float32 reference, CPU-to-CUDA staging, and one paged 8-bit optimizer step.

Each item takes the device and returns its figures with `ok` (true, false, or null with a `reason` where the device
cannot run it); bench/cuda_check.py runs them, records warnings and errors, and writes the JSON.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from finetune.moe.quantized import ExpertLoraFactors, QuantizedExperts

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


class Scratch:
    """Where items put their files: one folder per check run, removed at its end, so nothing is left in /tmp."""

    root: Path | None = None

    @classmethod
    def folder(cls, prefix: str) -> Path:
        if cls.root is None:
            cls.root = Path(tempfile.mkdtemp(prefix="cuda-check-"))
        return Path(tempfile.mkdtemp(prefix=prefix, dir=cls.root))

    @classmethod
    def remove(cls) -> None:
        if cls.root is not None:
            shutil.rmtree(cls.root, ignore_errors=True)
            cls.root = None
