"""`ExpertLoraLayer`: LoRA on one projection of every expert, in the exact layout of PEFT's `lora.ParamWrapper`.

lora_A (E*r, in) expert-slowest, lora_B (out, r*E) expert-fastest, gate_up wrapped innermost: PEFT's own
`save_pretrained` writes the keys stock PEFT expects. Unlike ParamWrapper it never folds B·A into the expert stack:
`QuantizedExperts` computes (x·A_e)·B_e·scaling inside the routed forward, one expert at a time.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from finetune.moe.quantized import PROJECTIONS, ExpertLoraFactors, QuantizedExperts


class ExpertLoraLayer(nn.Module, BaseTunerLayer):
    """LoRA on one projection of every expert in a layer, laid out like PEFT's ParamWrapper for the same parameter."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(
        self,
        base_layer: nn.Module,
        parameter_name: str,
        adapter_name: str,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
    ):
        super().__init__()
        experts = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(experts, QuantizedExperts):
            raise TypeError(f"expert LoRA needs QuantizedExperts, got {type(experts).__name__}")
        if parameter_name not in PROJECTIONS:
            raise ValueError(f"parameter_name must be one of {PROJECTIONS}, got {parameter_name!r}")
        out_features, in_features = experts.shapes[parameter_name]
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.num_experts = experts.num_experts
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.scaling, self.use_rslora = {}, {}, {}, {}
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, use_rslora=use_rslora)

    def update_layer(self, adapter_name: str, r: int, alpha: float, *, use_rslora: bool = False) -> None:
        """Create adapter weights initialised like PEFT (A kaiming-uniform, B zeros), in float32 on the base device."""
        if r <= 0:
            raise ValueError(f"expert LoRA rank must be positive, got {r}")
        device = next(self.get_base_layer().parameters()).device
        a = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=device, dtype=torch.float32)
        b = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.r[adapter_name], self.lora_alpha[adapter_name], self.use_rslora[adapter_name] = r, alpha, use_rslora
        self.scaling[adapter_name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states, top_k_index, top_k_weights, expert_lora=None):
        lora = dict(expert_lora or {})
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise ValueError("expert LoRA supports one active adapter at a time")
        if active:
            name = active[0]
            lora[self.parameter_name] = ExpertLoraFactors(
                self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.num_experts
            )
        return self.base_layer(hidden_states, top_k_index, top_k_weights, expert_lora=lora)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("expert LoRA can't merge into 4-bit weights; use `finetune merge` on the 16-bit base")

    def unmerge(self) -> None:
        pass

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
        if merge:
            self.merge(safe_merge, adapter_names)
        return self.get_base_layer()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, r={self.r}"
