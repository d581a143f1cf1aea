"""PEFT's causal-LM wrapper, taught to add and switch adapters on our expert LoRA layers too.

Stock PEFT adds and switches adapters only on its own layer classes. TRL's DPO and KTO trainers keep the reference
policy as a second, frozen adapter named "ref" (a copy of the one being trained) and switch to it for the reference
pass. With this wrapper that works for the experts as well: the reference is base + the initial adapter, in the same
model, never a second copy of the base.
"""

from __future__ import annotations

import copy
import re

from peft import PeftModelForCausalLM
from peft.utils.constants import DUMMY_TARGET_MODULES

EXPERT_PREFIX = "mlp.experts."


def _expert_layers(model):
    from finetune.moe.lora import ExpertLoraLayer  # lora.py builds this wrapper: import at call time

    return [m for m in model.modules() if isinstance(m, ExpertLoraLayer)]


def pattern_value(patterns: dict, target: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module or parameter name ending in it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", target):
            return value
    return default


class MixtralPeftModel(PeftModelForCausalLM):
    """A PeftModelForCausalLM whose add_adapter/set_adapter also cover `ExpertLoraLayer` (PEFT's own code otherwise)."""

    def add_adapter(self, adapter_name, peft_config, low_cpu_mem_usage: bool = False, autocast_adapter_dtype=True):
        experts = list(peft_config.target_parameters or [])
        stock = copy.deepcopy(peft_config)
        stock.target_parameters = None  # stock PEFT would look for nn.Parameters our quantised experts don't have
        for patterns in (stock.rank_pattern, stock.alpha_pattern):
            for key in [k for k in patterns if k.startswith(EXPERT_PREFIX)]:
                del patterns[key]
        if not stock.target_modules:
            stock.target_modules = DUMMY_TARGET_MODULES
        super().add_adapter(adapter_name, stock, low_cpu_mem_usage, autocast_adapter_dtype)
        self.peft_config[adapter_name] = peft_config  # the real config, experts included, is what gets saved
        for layer in _expert_layers(self):
            target = EXPERT_PREFIX + layer.parameter_name
            if target in experts:
                r = pattern_value(peft_config.rank_pattern, target, peft_config.r)
                alpha = pattern_value(peft_config.alpha_pattern, target, peft_config.lora_alpha)
                layer.update_layer(adapter_name, r, alpha, use_rslora=peft_config.use_rslora)

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        """Loading into an adapter that exists (the Trainer resuming from a checkpoint) keeps its dtype: stock PEFT
        upcasts it to fp32, so a QLoRA run that TRL trains in bf16 would resume in fp32 and end elsewhere."""
        if adapter_name in self.peft_config:
            kwargs["autocast_adapter_dtype"] = False
        return super().load_adapter(model_id, adapter_name, *args, **kwargs)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for layer in _expert_layers(self):
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
