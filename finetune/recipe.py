"""The typed recipe: one YAML file gives every setting of one run.

`load_recipe(path, overrides)` reads YAML, applies `--set key=value` overrides, validates the whole tree
with pydantic and reports every problem at once (dotted key path, what was given, what is accepted),
before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_tools.config import DataConfig
from finetune.errors import UserError
from finetune.recipe_errors import closest, format_validation_error, path_problems

Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


# Sane ranges: beyond them a value is a typo (1e26 steps, rank 10^6), and would fail late or train nonsense.
MAX_STEPS = 10**9
MAX_BATCH = 2**16
MAX_RANK = 2**16
SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed uses


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf`, `.nan` and overflowing literals like 1.0e+999 are refused everywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSettings(Strict):
    path: str = Field(
        description="Hub id, local folder with safetensors weights, or the built-in 'tiny-random-mixtral'"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when path is a hub id")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on GPUs that support it, float32 on CPU"
    )
    quantization: Literal["nf4", "fp4", "int8", "none"] = Field(
        "nf4", description="How base weights (attention and every expert) are stored: 4-bit NF4/FP4, 8-bit, or none"
    )
    double_quant: bool = Field(True, description="Quantise the 4-bit block scales too (saves ~0.37 bits/param)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = the CUDA device when present, else CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers choose"
    )
    allow_pickle: bool = Field(
        False, description="Allow pickle-based .bin/.pt checkpoints (they can run code when loaded); off by default"
    )
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model/tokenizer repo to run")


class LoraSettings(Strict):
    r: int = Field(16, gt=0, le=MAX_RANK, description="LoRA rank of the attention adapters")
    alpha: float = Field(32.0, gt=0, le=1e6, description="LoRA alpha of the attention adapters (scale = alpha / r)")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on attention LoRA inputs (expert LoRA has none, as in PEFT)"
    )
    attention_targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj"]] = Field(
        default_factory=lambda: list(ATTENTION_PROJECTIONS), description="Attention projections that get LoRA"
    )
    expert_targets: list[Literal["gate_up_proj", "down_proj"]] = Field(
        default_factory=lambda: list(EXPERT_PROJECTIONS),
        description="Expert projections that get LoRA, in every expert",
    )
    expert_r: int | None = Field(
        None, gt=0, le=MAX_RANK, description="LoRA rank of the expert adapters (default: lora.r)"
    )
    expert_alpha: float | None = Field(
        None, gt=0, le=1e6, description="LoRA alpha of the expert adapters (default: lora.alpha)"
    )
    router: Literal["frozen", "trainable"] = Field("frozen", description="Keep the router frozen or train it fully")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r)")

    @model_validator(mode="after")
    def _some_target(self) -> LoraSettings:
        if not self.attention_targets and not self.expert_targets:
            raise ValueError("lora needs at least one of attention_targets or expert_targets")
        return self


class MoeSettings(Strict):
    aux_loss: bool = Field(True, description="Add the router load-balancing loss; turning it off must be explicit")
    aux_loss_coef: float = Field(0.02, ge=0, le=10, description="Weight of the load-balancing loss (Mixtral used 0.02)")
    track_expert_load: bool = Field(True, description="Log per-layer expert load, imbalance and router entropy")

    @model_validator(mode="after")
    def _explicit_off(self) -> MoeSettings:
        if self.aux_loss and self.aux_loss_coef == 0:
            raise ValueError("aux_loss_coef is 0 while aux_loss is on; set moe.aux_loss: false to turn it off")
        return self


class TrainingSettings(Strict):
    max_steps: int = Field(-1, description=f"Optimizer steps to run (1 to {MAX_STEPS}); -1 = run num_epochs")
    num_epochs: float = Field(1.0, gt=0, le=1e4, description="Epochs over the train set when max_steps is -1")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for model init of adapters, data order and dropout")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate")
    lr_scheduler: Scheduler = Field("cosine", description="Learning-rate schedule")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate")
    batch_size: int = Field(1, gt=0, le=MAX_BATCH, description="Sequences per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, gt=0, le=MAX_BATCH, description="Micro-batches per optimizer step")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory")
    optimizer: str = Field("adamw_torch", description="Any transformers optimizer name, e.g. paged_adamw_8bit")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm (0 = off)")
    logging_steps: int = Field(10, gt=0, le=MAX_STEPS, description="Log every N optimizer steps")
    eval_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Evaluate every N steps (None = at the end only)"
    )
    save_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Checkpoint every N steps into checkpoints/ (None = off)"
    )
    save_total_limit: int | None = Field(2, gt=0, le=10**6, description="Keep at most this many checkpoints")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Passthrough to TRL's SFTConfig/DPOConfig for arguments not named here"
    )

    @field_validator("max_steps")
    @classmethod
    def _step_count(cls, value: int) -> int:
        if value != -1 and not 1 <= value <= MAX_STEPS:
            raise ValueError(f"got {value}; use -1 (run training.num_epochs) or a step count from 1 to {MAX_STEPS}")
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            raise ValueError(f"unknown optimizer {value!r}; accepted: {', '.join(names)}")
        return value


class TrackingSettings(Strict):
    backend: Literal["none", "wandb"] = Field("none", description="Where metrics go besides metrics.jsonl")
    project: str = Field("finetune", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    run_name: str | None = Field(None, description="Run name (default: the output folder name)")
    tags: list[str] = Field(default_factory=list, description="W&B tags")


class Recipe(Strict):
    model: ModelSettings = Field(description="Base model and how it is loaded")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapters on attention and experts")
    data: DataConfig = Field(description="Training data, chat format, lengths and packing")
    method: Literal["sft", "dpo"] = Field("sft", description="Training method")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Optimisation and schedule")
    moe: MoeSettings = Field(default_factory=MoeSettings, description="Mixture-of-experts specific settings")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="Experiment tracking")
    output_dir: str = Field(description="Folder for adapter/, recipe.yaml, metrics.json and checkpoints/")


# --- loading ---------------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file; bad bytes, syntax errors and duplicate keys name the line (and column)."""
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    loader = yaml.SafeLoader(recipe_text(path, path.read_bytes()))
    try:
        node = loader.get_single_node()
        duplicates = duplicate_keys(node) if node is not None else []
        if duplicates:
            raise UserError(
                f"{path}: duplicate keys (YAML would silently keep the last one); keep one of each",
                [f"{path}:{line}: duplicate key {key!r} (first at line {first})" for key, line, first in duplicates],
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML error: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys (model, lora, data, ...), got {type(data).__name__}")
    return data


def duplicate_keys(node: yaml.Node, prefix: str = "", seen: set[int] | None = None) -> list[tuple[str, int, int]]:
    """(dotted key, line, line of the first occurrence) for every key repeated within one mapping."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already walked
        return []
    seen.add(id(node))
    found: list[tuple[str, int, int]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are meant to be overridden
                continue
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in first:
                found.append((key, line, first[key]))
            first.setdefault(key, line)
            found += duplicate_keys(value_node, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += duplicate_keys(item, f"{prefix}[{i}]", seen)
    return found


NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE  # what YAML refuses: control characters other than tab/newline
CONTROL_NAMES = {"\x1b": "ESC, the start of a terminal colour code such as \\x1b[31m"}


def recipe_text(path: Path, raw: bytes) -> str:
    """The recipe as text, or a `FILE:LINE:COL` error saying what is there when it is not UTF-8 YAML text."""
    if looks_utf16(raw):
        raise UserError(f"{path}: the file is UTF-16 text; save it as UTF-8 (a recipe is UTF-8 YAML)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = line_column(raw, e.start)
        kind = "binary data, not text" if b"\x00" in raw else "text in another encoding (Latin-1? Windows-1252?)"
        raise UserError(
            f"{path}:{line}:{column}: byte 0x{raw[e.start]:02x} is not UTF-8: {kind}; a recipe is UTF-8 YAML text"
        ) from None
    bad = [(m.start(), m.group()) for m in NON_PRINTABLE.finditer(text)]
    if bad:
        problems = []
        for offset, char in bad[:10]:
            line, column = line_column(text, offset)
            code = repr(char)[1:-1]
            what = CONTROL_NAMES.get(char, "a control character")
            problems.append(f"{path}:{line}:{column}: {code} ({what}); delete it")
        raise UserError(
            f"{path}: {len(bad)} control character(s), which YAML does not allow (pasted from a terminal?)", problems
        )
    return text


def looks_utf16(raw: bytes) -> bool:
    """A UTF-16 byte-order mark, or ASCII text with a NUL byte beside every character."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    head = raw[:200]
    even, odd = head[0::2], head[1::2]
    return len(head) >= 4 and (even.count(0) == len(even)) != (odd.count(0) == len(odd))


def line_column(text: str | bytes, offset: int) -> tuple[int, int]:
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1
    return line, offset - (text.rfind(newline, 0, offset) + 1) + 1


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Apply `a.b.c=value` overrides in place (value parsed as YAML, so typed later by the schema).

    A numeric segment indexes a list (`data.train.0.path=x`). Returns problems instead of raising.
    """
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=10")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                problems.append(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
                break
        else:
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
    return problems


def trainer_config_fields(method: str) -> set[str]:
    """Argument names of the TRL config class the method uses (for checking training.extra)."""
    if method == "dpo":
        from trl import DPOConfig as config_cls
    else:
        from trl import SFTConfig as config_cls
    return {f.name for f in dataclasses.fields(config_cls) if f.init}


# Trainer arguments that the schema sets itself; naming them in training.extra would fight the schema.
OWNED_TRAINER_ARGS = {
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.num_epochs",
    "seed": "training.seed",
    "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "optim": "training.optimizer",
    "output_dir": "output_dir",
    "max_length": "data.max_length",
    "router_aux_loss_coef": "moe.aux_loss_coef",
    "report_to": "tracking.backend",
}


def extra_problems(data: dict[str, Any]) -> list[str]:
    """Names in training.extra (raw recipe) that TRL's config for the method does not take, or the schema owns."""
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    extra = training.get("extra")
    if not isinstance(extra, dict):
        return []
    method = data.get("method", "sft")
    fields = trainer_config_fields("dpo" if method == "dpo" else "sft")
    config_name = "DPOConfig" if method == "dpo" else "SFTConfig"
    problems = []
    for name, value in extra.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"training.extra.{name}: got {value}; give a finite number")
        if name in OWNED_TRAINER_ARGS:
            problems.append(f"training.extra.{name}: set by the recipe; use {OWNED_TRAINER_ARGS[name]} instead")
        elif name not in fields:
            hint = closest(str(name), sorted(fields))
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            problems.append(f"training.extra.{name}: not an argument of trl.{config_name}{suggestion}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raises UserError listing every problem at once."""
    path = Path(path)
    data = read_yaml(path)
    problems = apply_overrides(data, overrides)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems += format_validation_error(e, Recipe)
    problems += extra_problems(data) + path_problems(data)
    if problems or recipe is None:
        raise UserError(f"{path}: {len(problems)} problem(s) in the recipe", problems)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in (what `validate` prints and runs save)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
