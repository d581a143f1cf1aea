"""The benchmark's model variants and what it counts on them: resident bytes, 16-bit expert weights, trainable LoRA.

ours = finetune.moe; (a) stock bitsandbytes 4-bit + PEFT target_parameters; (b) (a) + bitsandbytes'
replace_parameter_4bit on the experts, with PEFT made to match (three silent PEFT failures, see apply_peft_dequant).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["gate_up_proj", "down_proj"]


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if getattr(state, "offset", None) is not None:
        tensors.append(state.offset)
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def resident_bytes(model: torch.nn.Module) -> int:
    """Parameters + buffers + bitsandbytes quant states (Params4bit and parametrizations keep those outside both)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if getattr(module, "quant_state", None) is not None:  # Bnb4bitParametrization
            tensors += _quant_state_tensors(module.quant_state)
    for param in model.parameters():
        if getattr(param, "quant_state", None) is not None:  # bnb Params4bit
            tensors += _quant_state_tensors(param.quant_state)
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def expert_wide_params(model: torch.nn.Module) -> int:
    """Frozen expert weights still held as 16/32-bit floats (the baseline-(a) trap); LoRA factors excluded."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rpartition(".")[2]
        if any(s in leaf for s in ("absmax", "code", "quant_map", "offset", "scale")):
            continue  # quantisation statistics, not weights
        if ".experts." in name and "lora_" not in name and t.is_floating_point():
            total += t.numel()
    return total


def count_trainable(model: torch.nn.Module) -> dict[str, int]:
    counts = {"attention_lora": 0, "expert_lora": 0, "other": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".experts." in name or name.endswith(".experts"):
            counts["expert_lora"] += p.numel()
        elif any(f".{t}." in name for t in ATTENTION_TARGETS):
            counts["attention_lora"] += p.numel()
        else:
            counts["other"] += p.numel()
    return counts


def expert_lora_with_grad(model: torch.nn.Module) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ".experts." in n and p.grad is not None
    )


def sync_device(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- variants


def _bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_variant(variant: str, model_dir: Path, device: str, dtype: torch.dtype):
    """Load the base model the way each variant would; returns (model, extra report fields)."""
    if variant == "ours":
        from finetune.moe.loading import load_mixtral

        model, report = load_mixtral(str(model_dir), quantization="nf4", dtype=dtype, device=device)
        return model, {"report_model_bytes": report.model_bytes, "report_quantized_fraction": report.quantized_fraction}
    from transformers import AutoModelForCausalLM

    target = torch.device(device)
    device_map = {"": target.index or 0} if target.type == "cuda" else {"": target.type}
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=_bnb_config(dtype), dtype=dtype, device_map=device_map
    )
    from finetune.moe.loading import keep_standard_cpu_layout

    keep_standard_cpu_layout(model)  # the baselines get the same correct CPU path as ours
    if variant in ("dequant", "dequant-naive"):
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        for module in _experts_modules(model):
            for name in EXPERT_PARAMS:
                replace_parameter_4bit(module, name, compress_statistics=True, quant_type="nf4", blocksize=64)
        gc.collect()
    return model, {}


def _experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    # isinstance, not the class name: parametrizing swaps the class for a `ParametrizedMixtralExperts` subclass
    return [m for m in model.modules() if isinstance(m, MixtralExperts)]


def apply_peft_dequant(model: torch.nn.Module, lora_config_kwargs: dict[str, Any]):
    """PEFT expert LoRA over bnb-parametrized expert weights, with the three things that break it worked around.

    1. Matching: PEFT matches `target_parameters` by suffix only for plain parameters; a parametrized one must be
       named by its full module path, else nothing is attached (silently, 0 expert LoRA parameters).
    2. Stale proxies: PEFT removes its per-forward `_LoraFactorsProxy` only when it is the sole parametrization, so
       on top of bnb's it stays, and the next forward fails. A forward hook on each wrapper removes it.
    3. Cached weight: the outer wrapper's `parametrize.cached()` caches the inner wrapper's parameter before the
       inner proxy is registered, so the inner projection's LoRA gets no gradient (silently). A pre-hook on the
       experts module drops that cache entry set so the weight is recomputed with both proxies.
    """
    import torch.nn.utils.parametrize as parametrize
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, MixtralExperts):
            names += [f"{module_name}.{p}" for p in EXPERT_PARAMS]
    peft_model = get_peft_model(model, LoraConfig(target_parameters=names, **lora_config_kwargs))

    def drop_stale_proxy(wrapper, args, output):
        chain = wrapper.get_base_layer().parametrizations[wrapper.parameter_name]
        for i in reversed(range(len(chain))):
            if isinstance(chain[i], _LoraFactorsProxy):
                del chain[i]

    def recompute_cached_weights(module, args):
        parametrize._cache.clear()

    for module in peft_model.modules():
        if isinstance(module, ParamWrapper):
            module.register_forward_hook(drop_stale_proxy, always_call=True)
    for module in _experts_modules(peft_model):
        module.register_forward_pre_hook(recompute_cached_weights)
    return peft_model


def apply_variant_lora(variant: str, model: torch.nn.Module, r: int, alpha: int):
    if variant == "ours":
        from finetune.moe.lora import apply_lora

        return apply_lora(
            model, attention_targets=ATTENTION_TARGETS, r=r, alpha=alpha, dropout=0.0, expert_targets=EXPERT_PARAMS,
            expert_r=r, expert_alpha=alpha,
        )  # fmt: skip
    kwargs = {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": ATTENTION_TARGETS}
    if variant == "dequant":
        return apply_peft_dequant(model, kwargs)
    from peft import LoraConfig, get_peft_model

    # the obvious config, as for a plain model: works for (a), attaches nothing to (b)'s parametrized experts
    return get_peft_model(model, LoraConfig(target_parameters=[f"mlp.experts.{p}" for p in EXPERT_PARAMS], **kwargs))


# --------------------------------------------------------------------------------------------- one variant


def preimport(variant: str) -> None:
    import bitsandbytes.nn.parametrize  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    if variant == "ours":
        import finetune.moe.loading
        import finetune.moe.lora  # noqa: F401
