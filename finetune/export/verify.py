"""Prove a merge: the merged checkpoint's logits against the unmerged model's, on fixed inputs.

`original` merges are checked against stock transformers + stock PEFT on the 16-bit base (no code of ours in the
reference); `dequantized` merges against our quantised forward with the adapter, the function QLoRA trained.
When two float32 copies of the model do not fit in memory, both sides are built from the first layers only
(a truncated model), and the result says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

# max |merged - reference| / max |reference| allowed, by the precision of the weights compared
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
MEMORY_SHARE = 0.5  # of the memory available now, for the two float32 models of the check


@dataclass
class Verification:
    relative_diff: float
    tolerance: float
    layers: int
    total_layers: int

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def describe(self) -> str:
        scope = "the whole model" if self.layers == self.total_layers else (
            f"a truncated model (first {self.layers} of {self.total_layers} layers, as memory allows)"
        )  # fmt: skip
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"verify: max |merged - unmerged| / max |logit| = {self.relative_diff:.2e} on {scope} "
            f"(tolerance {self.tolerance:.0e}): {verdict}"
        )


def layers_that_fit(config: dict) -> int:
    """How many decoder layers two float32 copies can hold in half the memory available now (at least one)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    total = config["num_hidden_layers"]
    with torch.device("meta"):
        one_layer = MixtralForCausalLM(MixtralConfig(**{**config, "num_hidden_layers": 1}))
    per_layer = sum(p.numel() for p in one_layer.model.layers[0].parameters()) * 4
    rest = sum(p.numel() for p in one_layer.parameters()) * 4 - per_layer
    budget = psutil.virtual_memory().available * MEMORY_SHARE / 2 - rest
    return max(1, min(total, int(budget // per_layer)))


def _inputs(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def _stock(folder: Path, layers: int):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(folder), dtype=torch.float32, num_hidden_layers=layers).eval()


def _reference(base_dir: Path, adapter_dir: Path, onto: str, quantization, layers: int):
    if onto == "original":
        from peft import PeftModel

        return PeftModel.from_pretrained(_stock(base_dir, layers), str(adapter_dir)).eval()
    from finetune.moe.loading import load_mixtral
    from finetune.moe.lora import load_adapter

    model, _ = load_mixtral(
        base_dir,
        quantization=quantization.kind,
        dtype=quantization.dtype,
        double_quant=quantization.double_quant,
        blocksize=quantization.blocksize,
        num_layers=layers,
    )
    return load_adapter(model, adapter_dir).eval()


def _round_base_weights(model, dtype: torch.dtype) -> None:
    """Give the reference's unmerged float weights the merged file's precision, LoRA factors excepted.

    A bf16 merge stores round(W + BA); the fair reference is round(W) + BA. Without this, a float32 base written
    as bf16 rounds every weight (router included), top-2 routing flips on near-ties, and the check measures the
    dtype conversion instead of the merge.
    """
    for name, param in model.named_parameters():
        if "lora_" not in name and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype).to(param.dtype)


def verify_merge(
    merged_dir: Path, base_dir: Path, adapter_dir: Path, *, onto: str, quantization, dtype
) -> Verification:
    """Compare merged and unmerged logits; `dtype` is the merged weights' dtype (it sets the tolerance)."""
    from transformers.utils import logging as hf_logging

    config = json.loads((base_dir / "config.json").read_text())
    layers = layers_that_fit(config)
    ids = _inputs(config["vocab_size"])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a truncated load reports the later layers' weights as unused: expected
    try:
        with torch.no_grad():
            model = _reference(base_dir, adapter_dir, onto, quantization, layers)
            _round_base_weights(model, dtype)
            reference = model(ids).logits.float()
            del model
            merged = _stock(merged_dir, layers)(ids).logits.float()
    finally:
        hf_logging.set_verbosity(verbosity)
    diff = ((merged - reference).abs().max() / reference.abs().max()).item()
    tolerance = TOLERANCE.get(dtype, 3e-2)
    if onto == "dequantized":
        tolerance = max(tolerance, TOLERANCE.get(quantization.dtype, 3e-2))
    return Verification(diff, tolerance, layers, config["num_hidden_layers"])
