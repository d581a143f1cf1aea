"""The Mixtral-specific core: experts kept in 4-bit (or int8) with LoRA computed per routed expert.

- `loading.load_mixtral` streams a safetensors checkpoint into a model whose experts are `QuantizedExperts` and whose
  attention projections are bitsandbytes 4/8-bit layers, quantising each tensor as it arrives.
- `lora.apply_lora` adds attention LoRA through stock PEFT and per-expert LoRA in PEFT's `target_parameters` layout,
  so `save_adapter` writes an adapter that stock `PeftModel.from_pretrained` loads onto a stock Mixtral.
- `routing.ExpertLoadTracker` collects per-layer expert load and router entropy.
"""

from finetune.moe.expert_layer import ExpertLoraLayer
from finetune.moe.loading import LoadReport, load_mixtral, model_bytes, verify_quantized
from finetune.moe.lora import apply_lora, load_adapter, lora_summary, save_adapter
from finetune.moe.quantized import QuantizedExperts
from finetune.moe.router import Float32Router
from finetune.moe.routing import ExpertLoadTracker

__all__ = [
    "ExpertLoadTracker",
    "ExpertLoraLayer",
    "Float32Router",
    "LoadReport",
    "QuantizedExperts",
    "apply_lora",
    "load_adapter",
    "load_mixtral",
    "lora_summary",
    "model_bytes",
    "save_adapter",
    "verify_quantized",
]
