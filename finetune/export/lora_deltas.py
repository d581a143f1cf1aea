"""A saved PEFT adapter as a set of weight deltas keyed by the base checkpoint tensors they change.

Reads exactly what PEFT writes for a Mixtral run (attention `target_modules`, expert `target_parameters`, the router
in `modules_to_save`) and answers, for any base tensor name, in either on-disk layout (per-expert w1/w2/w3 or fused
gate_up_proj/down_proj), what to add or replace. Every adapter tensor must be used exactly once: `Usage` keeps count.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune.errors import UserError
from finetune.moe.peft_model import pattern_value

PREFIX = "base_model.model."
EXPERT_LORA = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])\.weight$")
LINEAR_LORA = re.compile(r"^(.+)\.lora_([AB])\.weight$")
# v5 names the router `mlp.gate`; per-expert checkpoints name it `block_sparse_moe.gate`
ROUTER_ALIASES = (".block_sparse_moe.gate.", ".mlp.gate.")


@dataclass
class LinearDelta:
    """delta = B @ A * scaling for one nn.Linear weight."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.b.float() @ self.a.float()).mul_(self.scaling)  # in place: one (out, in) float32 buffer


@dataclass
class ExpertDelta:
    """One projection of every expert of a layer, in PEFT's layout: A (E*r, in) expert-slowest, B (out, r*E)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    num_experts: int

    def delta(self, expert: int, rows: slice = slice(None)) -> torch.Tensor:
        """Expert `expert`'s delta (out, in), or only its `rows` (the gate or up half of gate_up)."""
        r = self.a.shape[0] // self.num_experts
        a_e = self.a[expert * r : (expert + 1) * r].float()
        b_e = self.b[rows, expert :: self.num_experts].float()
        return (b_e @ a_e).mul_(self.scaling)


@dataclass
class AdapterDeltas:
    linear: dict[str, LinearDelta] = field(default_factory=dict)  # base key "….q_proj.weight"
    experts: dict[tuple[int, str], ExpertDelta] = field(default_factory=dict)  # (layer, gate_up_proj|down_proj)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: base key -> new tensor
    source: dict[object, str] = field(default_factory=dict)  # item -> adapter tensor name, for messages

    def nbytes(self) -> int:
        tensors = [t for d in self.linear.values() for t in (d.a, d.b)]
        tensors += [t for d in self.experts.values() for t in (d.a, d.b)] + list(self.replaced.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def canonical_key(key: str) -> str:
    """Base key with the router under its v5 name, so per-expert and fused checkpoints compare equal."""
    return key.replace(ROUTER_ALIASES[0], ROUTER_ALIASES[1])


def read_adapter(adapter_dir: Path, num_experts: int) -> AdapterDeltas:
    """Parse adapter_config.json + adapter_model.safetensors; anything we cannot place is a UserError naming it."""
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UserError(f"{config_file}: only plain LoRA adapters can be merged (found {config.get('peft_type')})")
    weights = load_file(str(weights_file))
    alpha, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora"))
    alpha_pattern = config.get("alpha_pattern") or {}  # ranks come from the tensor shapes themselves
    targets = list(config.get("target_parameters") or [])

    def scaling(name: str, r: int) -> float:
        a = pattern_value(alpha_pattern, name, alpha)
        return a / math.sqrt(r) if rslora else a / r

    out = AdapterDeltas()
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for full_name, tensor in weights.items():
        name = full_name.removeprefix(PREFIX)
        if m := EXPERT_LORA.match(name):
            depth = m.group(2).count("base_layer.")
            if depth >= len(targets):
                raise UserError(f"adapter tensor {full_name}: no matching entry in target_parameters {targets}")
            proj = targets[len(targets) - 1 - depth].rpartition(".")[2]  # the first target is the innermost wrapper
            halves.setdefault(f"expert:{m.group(1)}:{proj}", {})[m.group(3)] = tensor
            out.source[(int(m.group(1)), proj)] = full_name
        elif m := LINEAR_LORA.match(name):
            halves.setdefault(f"linear:{m.group(1)}", {})[m.group(2)] = tensor
        elif "lora_" not in name:
            out.replaced[canonical_key(name)] = tensor  # modules_to_save (the router): replaces the base tensor
            out.source[canonical_key(name)] = full_name
        else:
            raise UserError(f"adapter tensor {full_name} is not a LoRA A/B weight that finetune merge understands")
    for item, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"adapter {adapter_dir}: {item.split(':', 1)[1]} has lora_{next(iter(pair))} only")
        kind, _, rest = item.partition(":")
        if kind == "expert":
            layer, proj = rest.split(":")
            r = pair["A"].shape[0] // num_experts
            if r * num_experts != pair["A"].shape[0]:
                raise UserError(
                    f"adapter tensor {out.source[(int(layer), proj)]}: {pair['A'].shape[0]} rows is not a multiple "
                    f"of the base's {num_experts} experts; was it trained for another base?"
                )
            target = f"model.layers.{layer}.mlp.experts.{proj}"
            out.experts[(int(layer), proj)] = ExpertDelta(pair["A"], pair["B"], scaling(target, r), num_experts)
        else:
            r = pair["A"].shape[0]
            out.linear[canonical_key(f"{rest}.weight")] = LinearDelta(pair["A"], pair["B"], scaling(rest, r))
            out.source[canonical_key(f"{rest}.weight")] = f"{PREFIX}{rest}.lora_A.weight"
    return out
