"""Recipe → tokenizer and LoRA-ready Mixtral.

Resolves where the weights are (built-in, local folder, hub snapshot), refuses unsafe or non-Mixtral
checkpoints with a clear error, then hands the folder to the streaming 4-bit loader in `finetune.moe`.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError
from finetune.memory import PeakMemory
from finetune.model.tiny import TINY_MODEL_NAME, materialize_builtin
from finetune.recipe.sections import LoraSettings, ModelSettings

MIXTRAL_ARCHITECTURES = {"MixtralForCausalLM"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "tekken.json"}


def device_problem(setting: str) -> str | None:
    if setting == "cuda" and not torch.cuda.is_available():
        return "model.device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'"
    return None


def resolve_device(setting: str) -> torch.device:
    problem = device_problem(setting)
    if problem:
        raise UserError(problem)
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


def looks_like_path(path: str) -> bool:
    """Hub ids are `org/name`; anything else (/, ./, ~, a backslash, no or several /) means a local folder, and so
    does `outputs/run` when `outputs` is a folder here."""
    if path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") != 1:
        return True
    return Path(path.split("/", 1)[0]).is_dir()


def missing_folder_problem(path: str, what: str = "model.path") -> str | None:
    """The error for a path meant as a local folder that does not exist (rather than a hub lookup that fails)."""
    if path == TINY_MODEL_NAME or Path(path).expanduser().exists() or not looks_like_path(path):
        return None
    return (
        f"{what}: {path} does not exist; give a model folder, a hub id (org/name) or {TINY_MODEL_NAME} "
        "(the built-in model)"
    )


def resolve_model_dir(
    path: str, *, revision: str | None = None, allow_pickle: bool = False, what: str = "model.path"
) -> Path:
    """A local folder for `path`: the built-in tiny model, an existing folder, or a hub snapshot."""
    if path == TINY_MODEL_NAME:
        return materialize_builtin(path)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{what}: {path!r} is a file; give the folder that holds config.json and weights")
        return local
    problem = missing_folder_problem(path, what)
    if problem:
        raise UserError(problem)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, auth, not found: all are the user's to fix
        raise UserError(
            f"{what}: could not fetch {path!r} from the hub: {type(e).__name__}: {e} (nor is it a folder here)"
        ) from None


def local_model_dir(path: str) -> Path | None:
    """The local folder (or file) `path` names; None for the built-in model (built lazily) and hub ids."""
    if path == TINY_MODEL_NAME:
        return None
    local = Path(path).expanduser()
    return local if local.exists() else None


def check_model_dir(model_dir: Path, settings: ModelSettings) -> dict[str, Any]:
    """Refuse what we will not load (see `model_dir_problems`), then convert allowed pickles to safetensors."""
    problems = model_dir_problems(model_dir, settings)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"model.path: {model_dir} cannot be loaded", problems)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if not any(model_dir.glob("*.safetensors")):
        convert_pickle_checkpoint(model_dir, [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES])
    if config.get("auto_map") and not settings.trust_remote_code:
        print(f"note: {model_dir} ships custom code (auto_map); it is not run. The native Mixtral class is used.")
    return config


def model_dir_problems(model_dir: Path, settings: ModelSettings) -> list[str]:
    """Everything wrong with a local model folder that shows without loading weights; writes nothing.

    Non-Mixtral or unreadable config.json, missing tokenizer files, pickle-only checkpoints (unless allowed) or
    unreadable ones, safetensors whose header is unreadable or whose size disagrees with it (truncated downloads).
    """
    if not model_dir.is_dir():
        return [f"model.path: {model_dir} is a file; give the folder that holds config.json and weights"]
    problems = config_problems(model_dir)
    names = {p.name for p in model_dir.iterdir()}
    if not names & TOKENIZER_FILES and not any(n.startswith("tokenizer.model.v") for n in names):
        problems.append(
            f"model.path: {model_dir} has no tokenizer files (tokenizer.json or tokenizer.model); "
            "copy them from the base model's folder"
        )
    shards = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if shards:
        problems += [p for p in map(safetensors_problem, shards) if p]
        problems += index_problems(model_dir)
    elif pickles and not settings.allow_pickle:
        problems.append(
            f"model.path: {model_dir} holds only pickle checkpoints ({', '.join(p.name for p in pickles[:3])}), "
            "which can run arbitrary code when loaded. Convert them to safetensors, or set model.allow_pickle: true "
            "if you trust the source."
        )
    elif pickles:
        problems += [
            f"model.path: {p} is not a readable PyTorch checkpoint (not a torch.save zip archive: truncated, "
            "corrupt or an old format); re-download it or convert it to safetensors"
            for p in pickles
            if not is_torch_zip(p)
        ]
    else:
        problems.append(f"model.path: {model_dir} has no *.safetensors weights")
    return problems


def config_problems(model_dir: Path) -> list[str]:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return [f"model.path: {model_dir} has no config.json; is it a transformers model folder?"]
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"{config_file}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(config_file)
        return [f"model.path: {where}: config.json is not valid JSON text ({e}); re-download it"]
    if not isinstance(config, dict):
        return [f"model.path: {config_file} holds a JSON {type(config).__name__}, not an object"]
    architectures = set(config.get("architectures") or [])
    if config.get("model_type") != "mixtral" or (architectures and not architectures & MIXTRAL_ARCHITECTURES):
        found = ", ".join(sorted(map(str, architectures))) or config.get("model_type", "unknown")
        return [
            f"model.path: {model_dir} is a {found} model; finetune trains Mixtral-architecture models "
            "(model_type 'mixtral', MixtralForCausalLM)"
        ]
    return []


def safetensors_problem(file: Path) -> str | None:
    """Read only the header: its JSON must parse and its data offsets must end exactly at the file's end."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or 8 + length > size:
                return f"model.path: {file} is truncated or not a safetensors file ({size} bytes); re-download it"
            header = json.loads(f.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + length + max(ends, default=0)
        if expected != size:
            what = "truncated" if size < expected else "longer than its header says"
            return f"model.path: {file} is {what} ({size} bytes, header describes {expected}); re-download it"
        from safetensors import safe_open

        with safe_open(str(file), framework="pt"):
            pass
    except Exception as e:  # bad JSON, missing keys, or safetensors' own checks: all mean a broken file
        return f"model.path: {file} is not a readable safetensors file ({type(e).__name__}: {e}); re-download it"
    return None


def index_problems(model_dir: Path) -> list[str]:
    """Shards that model.safetensors.index.json names but the folder lacks (an interrupted download)."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except Exception as e:  # bad JSON or a different layout
        return [f"model.path: {index} is not a readable index ({type(e).__name__}: {e})"]
    missing = sorted(s for s in shards if not (model_dir / s).is_file())
    return [f"model.path: {model_dir / s} is named in {index.name} but missing; re-download it" for s in missing]


def is_torch_zip(file: Path) -> bool:
    """torch.save's format is a zip with a data.pkl; anything else cannot be memory-mapped and converted."""
    try:
        with zipfile.ZipFile(file) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def convert_pickle_checkpoint(model_dir: Path, pickles: list[str]) -> None:
    """Allowed pickles are converted shard by shard to safetensors in place, so loading stays streaming.

    Each shard is written to a temporary name and renamed, so a failure never leaves half a safetensors file.
    """
    from safetensors.torch import save_file

    for name in sorted(pickles):
        target = model_dir / (Path(name).stem + ".safetensors")
        if target.exists():
            continue
        try:
            state = torch.load(model_dir / name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a pickle can fail in many ways; all mean the file is not a usable checkpoint
            raise UserError(f"model.path: cannot read {model_dir / name}: {type(e).__name__}: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"model.path: {model_dir / name} is not a flat state dict of tensors")
        tmp = target.with_name(target.name + ".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
        del state


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token that is never EOS (or EOS labels would be masked)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # missing or corrupt tokenizer files raise many types
        raise UserError(f"model.path: cannot load the tokenizer in {model_dir}: {type(e).__name__}: {e}") from None
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
    load_memory_added: int = 0  # host RSS peak above the start of loading (LoRA and FSDP2 sharding included)


def load_model(
    settings: ModelSettings, lora: LoraSettings, model_dir: Path, *, train_aux: bool, init_adapter: Path | None = None
) -> LoadedModel:
    """Load the base in the recipe's quantisation and attach LoRA; print what is quantised and what LoRA targets.

    Under FSDP2 each rank loads only its own experts and the model is sharded here, before the trainer exists."""
    import contextlib

    from finetune.distributed.sharding import load_sharding
    from finetune.moe.lora import lora_summary

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    sharding = load_sharding(device, dtype)  # None outside FSDP2
    host = PeakMemory("cpu") if device.type != "cpu" else None
    with PeakMemory(device) as peak, host or contextlib.nullcontext():
        model, report = _load_and_adapt(settings, lora, model_dir, device, dtype, sharding, train_aux, init_adapter)
    summary = [*report.summary_lines(), *lora_summary(model)]
    added = (host or peak).delta
    return LoadedModel(model, model_dir, device, dtype, peak.peak, report, summary, load_memory_added=added)


def _load_and_adapt(settings, lora, model_dir, device, dtype, sharding, train_aux, init_adapter):
    from finetune.distributed.sharding import expert_staging_device, quant_storage, shard_loaded
    from finetune.moe.loading import load_mixtral
    from finetune.moe.lora import apply_lora

    base, report = load_mixtral(
        model_dir,
        quantization=settings.quantization,
        dtype=dtype,
        device=device,
        double_quant=settings.double_quant,
        quant_storage=quant_storage(dtype),  # FSDP2 shards 4-bit attention only when packed in a float dtype
        expert_device=None if sharding else expert_staging_device(device),
        expert_shard=(sharding.rank, sharding.world) if sharding else None,  # FSDP2: only this rank's experts
    )
    if settings.attn_implementation:
        base.set_attn_implementation(settings.attn_implementation)
    base.config.output_router_logits = train_aux
    if init_adapter is not None:  # continue from a trained adapter (e.g. SFT before DPO): its own targets and ranks
        from finetune.moe.lora import load_adapter

        model = load_adapter(base, init_adapter, is_trainable=True, dropout=lora.dropout)
    else:
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
    if sharding is not None:
        model = shard_loaded(model, sharding)
    return model, report
