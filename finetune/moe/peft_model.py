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

from finetune.moe.expert_layer import ExpertLoraLayer

EXPERT_PREFIX = "mlp.experts."


def _expert_layers(model):
    return [m for m in model.modules() if isinstance(m, ExpertLoraLayer)]


def write_expert_ranks(config, experts: dict[str, tuple[int, float]]) -> None:
    """Put the experts' rank and alpha in the saved config where stock PEFT reads them without a false warning.

    Stock PEFT applies rank_pattern/alpha_pattern to `target_parameters`; 0.21 warned that every key matching no
    *module* of `target_modules` "was ignored" (an expert key such as 'mlp.experts.down_proj' always did), and a key
    that also matches an attention module would give it the expert rank. So the config's `r`/`lora_alpha` are the
    experts' and attention keeps its own through one pattern key per target module name ('q_proj'), which every
    version accepts. Only projections whose rank or alpha differs from the first one still need an expert key.
    """
    if not experts:
        return
    r, alpha = next(iter(experts.values()))
    ranks, alphas = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    attention = config.target_modules
    names = [attention] if isinstance(attention, str) else sorted(attention or [])
    for name in names:  # after any more specific key already there: the first matching key wins
        if config.r != r:
            ranks.setdefault(name, config.r)
        if config.lora_alpha != alpha:
            alphas.setdefault(name, config.lora_alpha)
    config.r, config.lora_alpha = r, alpha
    for proj, (expert_r, expert_alpha) in experts.items():
        if expert_r != r:
            ranks[EXPERT_PREFIX + proj] = expert_r
        if expert_alpha != alpha:
            alphas[EXPERT_PREFIX + proj] = expert_alpha
    config.rank_pattern, config.alpha_pattern = ranks, alphas


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

    def save_pretrained(self, save_directory, *args, save_embedding_layers="auto", **kwargs) -> None:
        """Every save, the Trainer's checkpoints included, leaves the embeddings out: we never train or resize them,
        and PEFT's "auto" check would look the base up on the hub (a network reach and a warning on every save)."""
        if save_embedding_layers == "auto":
            save_embedding_layers = False
        super().save_pretrained(save_directory, *args, save_embedding_layers=save_embedding_layers, **kwargs)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for layer in _expert_layers(self):
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
