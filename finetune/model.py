"""Recipe → tokenizer and LoRA-ready Mixtral.

Resolves where the weights are (built-in, local folder, hub snapshot), refuses unsafe or non-Mixtral
checkpoints with a clear error, then hands the folder to the streaming 4-bit loader in `finetune.moe`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError
from finetune.memory import PeakMemory
from finetune.recipe import LoraSettings, ModelSettings
from finetune.tiny import TINY_MODEL_NAME, materialize_builtin

MIXTRAL_ARCHITECTURES = {"MixtralForCausalLM"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        # under `accelerate launch` / torchrun each process loads its own copy onto its own GPU
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the GPU supports it and fp32 on CPU, where bf16 matmuls are emulated and slow."""
    if setting == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, setting)


def resolve_model_dir(path: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder for `path`: the built-in tiny model, an existing folder, or a hub snapshot."""
    if path == TINY_MODEL_NAME:
        return materialize_builtin(path)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model.path: {path!r} is a file; give the folder that holds config.json and weights")
        return local
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, auth, not found: all are the user's to fix
        raise UserError(f"model.path: could not fetch {path!r} from the hub: {type(e).__name__}: {e}") from None


def check_model_dir(model_dir: Path, settings: ModelSettings) -> dict[str, Any]:
    """Refuse what we will not load: non-Mixtral architectures and (unless allowed) pickle checkpoints."""
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise UserError(f"model.path: {model_dir} has no config.json; is it a transformers model folder?")
    config = json.loads(config_file.read_text())
    architectures = set(config.get("architectures") or [])
    if config.get("model_type") != "mixtral" or (architectures and not architectures & MIXTRAL_ARCHITECTURES):
        found = ", ".join(sorted(architectures)) or config.get("model_type", "unknown")
        raise UserError(
            f"model.path: {model_dir} is a {found} model; finetune trains Mixtral-architecture models "
            "(model_type 'mixtral', MixtralForCausalLM)"
        )
    has_safetensors = any(model_dir.glob("*.safetensors"))
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not has_safetensors and pickles:
        if not settings.allow_pickle:
            raise UserError(
                f"model.path: {model_dir} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])}), which "
                "can run arbitrary code when loaded. Convert them to safetensors, or set model.allow_pickle: true "
                "if you trust the source."
            )
        convert_pickle_checkpoint(model_dir, pickles)
    elif not has_safetensors:
        raise UserError(f"model.path: {model_dir} has no *.safetensors weights")
    if config.get("auto_map") and not settings.trust_remote_code:
        print(f"note: {model_dir} ships custom code (auto_map); it is not run. The native Mixtral class is used.")
    return config


def convert_pickle_checkpoint(model_dir: Path, pickles: list[str]) -> None:
    """Allowed pickles are converted shard by shard to safetensors in place, so loading stays streaming."""
    from safetensors.torch import save_file

    for name in sorted(pickles):
        target = model_dir / (Path(name).stem + ".safetensors")
        if target.exists():
            continue
        state = torch.load(model_dir / name, map_location="cpu", weights_only=True, mmap=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={"format": "pt"})
        del state


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token that is never EOS (or EOS labels would be masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            # a new token would lie outside the embedding matrix; better to say so than to grow the model silently
            raise UserError(
                f"model.path: the tokenizer in {model_dir} has no pad token and no unk token distinct from EOS; "
                "set a pad token (not EOS) in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


@dataclass
class LoadedModel:
    model: Any  # peft.PeftModel over MixtralForCausalLM
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    load_peak_memory: int
    report: Any  # finetune.moe.loading.LoadReport
    summary: list[str] = field(default_factory=list)


def load_model(settings: ModelSettings, lora: LoraSettings, model_dir: Path, *, train_aux: bool) -> LoadedModel:
    """Load the base in the recipe's quantisation and attach LoRA; print what is quantised and what LoRA targets."""
    from finetune.moe.loading import load_mixtral
    from finetune.moe.lora import apply_lora, lora_summary

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    with PeakMemory(device) as peak:
        base, report = load_mixtral(
            model_dir,
            quantization=settings.quantization,
            dtype=dtype,
            device=device,
            double_quant=settings.double_quant,
        )
    if settings.attn_implementation:
        base.set_attn_implementation(settings.attn_implementation)
    base.config.output_router_logits = train_aux
    model = apply_lora(
        base,
        attention_targets=list(lora.attention_targets),
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        expert_targets=list(lora.expert_targets),
        expert_r=lora.expert_r or lora.r,
        expert_alpha=lora.expert_alpha or lora.alpha,
        train_router=lora.router == "trainable",
        use_rslora=lora.use_rslora,
    )
    summary = [*report.summary_lines(), *lora_summary(model)]
    return LoadedModel(model, model_dir, device, dtype, peak.peak, report, summary)
