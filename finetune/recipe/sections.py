"""The recipe's sections for model, LoRA, MoE, training and tracking: types, ranges and the checks on each value.

Each field's description is the `--explain` help; every model forbids unknown keys and non-finite numbers.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


BACKEND_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}


def missing_backend_package(backend: str) -> str | None:
    """The pip package a tracking backend needs when it is not installed (None when fine or backend is none)."""
    package = BACKEND_PACKAGES.get(backend)
    return package if package and importlib.util.find_spec(package) is None else None


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
        None, gt=0, le=MAX_STEPS, description="Also checkpoint every N steps into checkpoints/ (None = by time only)"
    )
    save_minutes: float | None = Field(
        30.0,
        gt=0,
        le=10**6,
        description="Checkpoint when this many minutes have passed since the last save (None = by save_steps only); "
        "a killed run resumes from the newest checkpoint",
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
    """`tracking:`; metrics.jsonl is always written, whatever the backend (see finetune/tracking/sinks.py)."""

    backend: Literal["none", "wandb", "tensorboard", "mlflow"] = Field(
        "none", description="Where metrics go besides metrics.jsonl; tensorboard/mlflow need their pip package"
    )
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="W&B mode; auto: online when logged in (WANDB_API_KEY or netrc), else offline; never prompts",
    )
    project: str = Field("finetune", description="W&B / MLflow project (experiment)")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    run_name: str | None = Field(None, description="Run name (default: the output folder name)")
    group: str | None = Field(None, description="W&B run group")
    notes: str | None = Field(None, description="W&B run notes")
    tags: list[str] = Field(
        default_factory=list, description="Tags, added to the default ones (method, quantisation, model)"
    )
    sample_prompts: int = Field(
        4,
        ge=0,
        le=64,
        description="Eval prompts generated (greedy, adapter on) at each evaluation and at the end; 0: none",
    )
    sample_max_new_tokens: int = Field(32, ge=1, le=4096, description="New tokens per sample generation")
    log_adapter: bool = Field(False, description="Log the final adapter folder as a W&B artifact of type model")

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, value: str) -> str:
        package = missing_backend_package(value)
        if package:
            raise ValueError(f"backend {value} needs the {package} package; pip install {package}, or pick another")
        return value


# The loss names trl.DPOConfig accepts (trl 1.16); tests/test_recipe_preference.py compares them with TRL's own help.
