"""What a loaded model holds: resident bytes (bitsandbytes quant states included), a per-group report, and the
check that a quantised recipe left no expert weight in 16/32-bit.

`model_bytes` is the one formula for resident size: the loader's summary, `finetune plan` (on a meta skeleton) and
the FSDP2 per-rank figures all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import bitsandbytes as bnb
import torch
from torch import nn

from finetune.errors import UserError
from finetune.moe.quantized import QuantizedExperts

GROUPS = ("attention", "experts", "router", "embeddings", "norms", "lm_head")


@dataclass
class LoadReport:
    quantization: str
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    model_bytes: int = 0
    quantized_fraction: float = 0.0

    def summary_lines(self) -> list[str]:
        total = sum(g["params"] for g in self.groups.values())
        lines = [
            f"quantization: {self.quantization}; {total / 1e6:.2f}M base parameters, "
            f"{self.quantized_fraction:.1%} stored quantised; resident {self.model_bytes / 2**20:.1f} MiB"
        ]
        for name in GROUPS:
            g = self.groups.get(name)
            if not g or not g["params"]:
                continue
            state = "quantised" if g["quantized_params"] == g["params"] else "full precision"
            if 0 < g["quantized_params"] < g["params"]:
                state = f"{g['quantized_params'] / g['params']:.0%} quantised"
            lines.append(
                f"  {name:<10} {g['params'] / 1e6:9.2f}M params  {g['bytes'] / 2**20:9.1f} MiB  "
                f"({8 * g['bytes'] / g['params']:.2f} bits/param, {state})"
            )
        return lines


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a bitsandbytes parameter keeps outside its data: 4-bit QuantState, or int8 row scales."""
    out = _state_tensors(getattr(param, "quant_state", None))
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def _state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a 4-bit QuantState and its nested (double-quantisation) state."""
    out = []
    while state is not None:
        out += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
        state = state.state2
    return out


def is_adapter_tensor(name: str) -> bool:
    return ".lora_" in name or "modules_to_save." in name


def model_bytes(model: nn.Module, *, local: bool = False) -> int:
    """Bytes of the base model's parameters and buffers, including bitsandbytes quant states (adapters excluded).

    `local`: under FSDP2, count only this rank's shard of each sharded parameter (the bytes it keeps resident).
    """
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    tensors = [(n, t) for n, t in model.named_parameters()] + [(n, t) for n, t in model.named_buffers()]
    # an FSDP2 rank's experts loaded as a shard (not yet DTensors): the whole model's size, or the shard's
    whole = (
        {}
        if local
        else {id(p): n for m in model.modules() if isinstance(m, QuantizedExperts) for p, n in m.full_nbytes()}
    )
    for name, module in model.named_modules():
        # Linear8bitLt moves its row scales into module.state on first use; a sharded Linear4bit keeps its
        # quant state on the module only (the sharded parameter is no longer a Params4bit)
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(module, bnb.nn.Linear8bitLt) and isinstance(scb, torch.Tensor):
            tensors.append((name, scb))
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_state", None) is None:
            tensors += [(name, x) for x in _state_tensors(getattr(module, "quant_state", None))]
    for name, t in tensors:
        if is_adapter_tensor(name):
            continue
        if id(t) in whole:
            total += whole[id(t)]
            continue
        if isinstance(t, DTensor):
            if not local:  # the whole parameter's size, without gathering it
                total += t.numel() * t.element_size()
                continue
            t = t.to_local()
        for x in [t, *_quant_state_tensors(t)]:
            key = x.untyped_storage().data_ptr() if x.device.type != "meta" else id(x)
            if key in seen:
                continue
            seen.add(key)
            total += x.numel() * x.element_size()
    return total


def group_of(name: str) -> str | None:
    if ".self_attn." in name:
        return "attention"
    if ".experts." in name or name.endswith(".experts"):
        return "experts"
    if ".gate." in name and ".mlp." in name:
        return "router"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    return None


def build_report(model: nn.Module, quantization: str) -> LoadReport:
    """Count logical parameters, quantised parameters and resident bytes per group of a loaded model."""
    groups = {g: {"params": 0, "quantized_params": 0, "bytes": 0} for g in GROUPS}
    for mod_name, module in model.named_modules():
        if is_adapter_tensor(mod_name + "."):
            continue
        if isinstance(module, QuantizedExperts):
            g = groups["experts"]
            g["params"] += module.num_base_params
            g["quantized_params"] += module.num_base_params if module.quantization != "none" else 0
            g["bytes"] += sum(n for _, n in module.full_nbytes())  # the whole stack, also from one rank's shard
            continue
        for p_name, param in module.named_parameters(recurse=False):
            group = group_of(f"{mod_name}.{p_name}")
            if group is None:
                continue
            # a 4-bit weight may be packed into a float `quant_storage` (for FSDP), so ask bitsandbytes, not the dtype
            quantized = (isinstance(param, bnb.nn.Params4bit) and param.bnb_quantized) or (
                isinstance(param, bnb.nn.Int8Params) and param.dtype == torch.int8
            )
            n = module.in_features * module.out_features if quantized else param.numel()
            g = groups[group]
            g["params"] += n
            g["quantized_params"] += n if quantized else 0
            g["bytes"] += sum(t.numel() * t.element_size() for t in [param, *_quant_state_tensors(param)])
    total = sum(g["params"] for g in groups.values())
    quantized = sum(g["quantized_params"] for g in groups.values())
    return LoadReport(
        quantization=quantization,
        groups=groups,
        model_bytes=model_bytes(model),
        quantized_fraction=quantized / total if total else 0.0,
    )


def verify_quantized(model: nn.Module, quantization: str) -> None:
    """Fail loudly if a quantised recipe left any expert weight in 16/32-bit (the silent transformers trap)."""
    if quantization == "none":
        return
    problems = []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts") and not isinstance(module, QuantizedExperts):
            problems.append(f"{name} is {type(module).__name__}, not QuantizedExperts")
        elif isinstance(module, QuantizedExperts):
            if module.quantization != quantization:
                problems.append(f"{name} stores {module.quantization}, recipe asked for {quantization}")
            if not module.is_complete():
                problems.append(f"{name} has unfilled expert slots: {', '.join(module.missing()[:8])}")
    for name, tensor in model.named_parameters():
        if ".experts." in name and tensor.is_floating_point() and not is_adapter_tensor(name):
            problems.append(f"{name} is still {tensor.dtype} {tuple(tensor.shape)}")
    if problems:
        raise UserError(f"expert weights are not stored in {quantization} as the recipe asked", problems[:20])
