"""The CUDA self-check's distributed and end-to-end items: FSDP2 `fully_shard` with a bf16 MixedPrecisionPolicy on
one rank, a bitsandbytes optimizer on FSDP2's DTensor parameters (or finetune's refusal of that pairing), and one
TRL SFT step of the tiny recipe through finetune's run path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from cuda_items import HIDDEN, Scratch, experts, routed_inputs, sync, weights

from finetune.moe.quantized import QuantizedExperts

ROOT = Path(__file__).resolve().parent.parent


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
    store = Scratch.folder("pg-") / "store"
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

    out_dir = Scratch.folder("sft-")
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
        "ok": bool(loss is not None and math.isfinite(loss) and adapter.exists()),
    }
