"""The typed recipe: one YAML file gives every setting of one run.

`load_recipe(path, overrides)` reads YAML, applies `--set key=value` overrides, validates the whole tree
with pydantic and reports every problem at once (dotted key path, what was given, what is accepted),
before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_tools.config import DataConfig
from finetune.recipe_errors import closest, format_validation_error, path_problems
from finetune.recipe_evaluation import EvaluationSettings
from finetune.recipe_file import apply_overrides, blame_overrides, read_yaml

__all__ = [
    "DpoSettings",
    "KtoSettings",
    "Recipe",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "method_config_arguments",
    "method_settings",
    "read_yaml",
]

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
    """`tracking:`; metrics.jsonl is always written, whatever the backend (see finetune/tracking.py)."""

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
        from finetune.tracking import missing_backend_package

        package = missing_backend_package(value)
        if package:
            raise ValueError(f"backend {value} needs the {package} package; pip install {package}, or pick another")
        return value


# The loss names trl.DPOConfig accepts (trl 1.16); tests/test_recipe_preference.py compares them with TRL's own help.
DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
DPO_LOSSES = typing.get_args(DpoLoss)
# Losses built on the chosen-rejected reward difference: the only ones TRL lets a non-default f-divergence change.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
INIT_ADAPTER_TEXT = (
    "Start from this adapter (an SFT run's folder or its adapter/ folder): the reference is base + this adapter, "
    "frozen, while a trainable copy of it learns; none = a fresh adapter, so the reference is the base"
)
PRECOMPUTE_TEXT = (
    "Compute the reference log-probabilities in one extra pass over the data before training, instead of a "
    "reference forward pass every step"
)


class DpoSettings(Strict):
    """`dpo:`, read when method is dpo. Field names are trl.DPOConfig's, so the builder passes them as they are."""

    beta: float = Field(
        0.1, gt=0, le=100, description="How far the policy may move from the reference: higher = stays closer"
    )
    loss_type: list[DpoLoss] = Field(
        default_factory=lambda: ["sigmoid"],
        description="DPO loss: one name or a list of names whose losses are added (weighted by loss_weights)",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight (>= 0) per loss_type entry when combining losses; none = 1.0 each"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed chance a preference label is flipped (sigmoid, robust); EXO's epsilon, > 0 for exo_pair",
    )
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="Divergence that keeps the policy near the reference (f-DPO); reverse_kl = DPO"
    )
    f_alpha_divergence_coef: float = Field(
        0.5, gt=0, le=10, description="Alpha of the alpha-divergence; used only with f_divergence_type alpha_divergence"
    )
    use_weighting: bool = Field(False, description="Weight pairs by the policy's probability of them (WPO)")
    ld_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Weight of the tokens beyond the shorter answer's length (LD-DPO); none = no length weighting",
    )
    discopop_tau: float = Field(0.05, gt=0, le=100, description="Temperature of the discopop loss; used only by it")
    precompute_ref_log_probs: bool = Field(False, description=PRECOMPUTE_TEXT)
    init_adapter: str | None = Field(None, description=INIT_ADAPTER_TEXT)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value  # the type check says what is wrong
        if not names:
            raise ValueError(f"is empty; give a loss name or a list of them: {', '.join(DPO_LOSSES)}")
        for name in names:
            if isinstance(name, str) and name not in DPO_LOSSES:
                hint = closest(name, list(DPO_LOSSES))
                guess = f"did you mean {hint[0]}? " if hint else ""
                raise ValueError(f"unknown loss {name!r}; {guess}accepted: {', '.join(DPO_LOSSES)}")
        return names

    @field_validator("loss_weights")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(w < 0 for w in value):
            raise ValueError(f"got {value}; every weight must be >= 0")
        return value

    @model_validator(mode="after")
    def _as_trl_checks(self) -> DpoSettings:
        """TRL's own refusals, which would otherwise come as a traceback after the model has loaded."""
        losses = self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(
                f"dpo.loss_weights: has {len(self.loss_weights)} weight(s) for {len(losses)} loss_type(s) "
                f"{losses}; give one weight per loss"
            )
        if "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("dpo.label_smoothing: must be > 0 for the exo_pair loss (the EXO paper suggests 0.001)")
        odd = [name for name in losses if name not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and odd:
            raise ValueError(
                f"dpo.f_divergence_type: {self.f_divergence_type} does not apply to loss {', '.join(odd)}; "
                f"use reverse_kl, or losses among {', '.join(F_DIVERGENCE_LOSSES)}"
            )
        if self.use_weighting and {"aot", "aot_unpaired"} & set(losses):
            raise ValueError("dpo.use_weighting: does not work with the aot/aot_unpaired losses; set it to false")
        unused = {
            "f_alpha_divergence_coef": (
                self.f_divergence_type == "alpha_divergence",
                "f_divergence_type is alpha_divergence",
            ),
            "discopop_tau": ("discopop" in losses, "loss_type includes discopop"),
        }
        for name, (used, condition) in unused.items():
            value = getattr(self, name)
            if not used and value != type(self).model_fields[name].default:
                raise ValueError(f"dpo.{name}: {value} has no effect unless {condition}; remove it")
        return self


class KtoSettings(Strict):
    """`kto:`, read when method is kto. Field names are trl.KTOConfig's."""

    beta: float = Field(
        0.1, gt=0, le=100, description="How far the policy may move from the reference: higher = stays closer"
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (needs training.batch_size >= 2 for its KL estimate) or apo_zero_unpaired"
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Weight of desirable examples' loss, to balance unequal desirable/undesirable counts",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, le=100, description="Weight of undesirable examples' loss (see desirable_weight)"
    )
    precompute_ref_log_probs: bool = Field(False, description=PRECOMPUTE_TEXT)
    init_adapter: str | None = Field(None, description=INIT_ADAPTER_TEXT)


class Recipe(Strict):
    model: ModelSettings = Field(description="Base model and how it is loaded")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapters on attention and experts")
    data: DataConfig = Field(description="Training data, chat format, lengths and packing")
    method: Literal["sft", "dpo", "kto"] = Field(
        "sft", description="sft: chat data; dpo: preference pairs; kto: unpaired good/bad completions"
    )
    dpo: DpoSettings = Field(default_factory=DpoSettings, description="DPO settings (method: dpo)")
    kto: KtoSettings = Field(default_factory=KtoSettings, description="KTO settings (method: kto)")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Optimisation and schedule")
    moe: MoeSettings = Field(default_factory=MoeSettings, description="Mixture-of-experts specific settings")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="Experiment tracking")
    evaluation: EvaluationSettings | None = Field(
        None, description="Evaluate base vs adapter after training, as `finetune eval` does (none: no evaluation)"
    )
    output_dir: str = Field(description="Folder for adapter/, recipe.yaml, metrics.json and checkpoints/")

    @model_validator(mode="after")
    def _method_fits(self) -> Recipe:
        """Settings that only make sense together; every line names the key to change."""
        problems = []
        for section in METHOD_SECTIONS:
            if section in self.model_fields_set and section != self.method:
                problems.append(
                    f"{section}: section given but method is {self.method}; set method: {section} or remove it"
                )
        if self.method == "kto" and self.kto.loss_type == "kto":
            if self.training.batch_size < 2:
                problems.append(
                    f"training.batch_size: got {self.training.batch_size}; the kto loss needs >= 2 (it estimates "
                    "its KL term from the other completions in a micro-batch), or use kto.loss_type: apo_zero_unpaired"
                )
            strategy = self.training.extra.get("train_sampling_strategy", "sequential")
            if strategy != "sequential":
                problems.append(
                    f"training.extra.train_sampling_strategy: got {strategy!r}; the kto loss needs 'sequential' "
                    "(its KL pairs neighbours in a fixed order); remove the key"
                )
        if self.method in ("dpo", "kto") and self.training.extra.get("sync_ref_model"):
            problems.append(
                "training.extra.sync_ref_model: TRL cannot sync the reference with LoRA adapters (the reference "
                f"is the frozen starting adapter); remove it, or use {self.method}.init_adapter for a new reference"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


METHOD_SECTIONS = ("dpo", "kto")


def method_settings(recipe: Recipe) -> DpoSettings | KtoSettings | None:
    """The settings section of the recipe's method (defaults when not written); None for sft, which has none."""
    return getattr(recipe, recipe.method) if recipe.method in METHOD_SECTIONS else None


def method_config_arguments(recipe: Recipe) -> dict[str, Any]:
    """The method section as keyword arguments of its TRL config (same names), init_adapter left out."""
    settings = method_settings(recipe)
    return {} if settings is None else settings.model_dump(exclude={"init_adapter"})


# --- loading ---------------------------------------------------------------------------------------------------


TRAINER_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig"}


def trainer_config_fields(method: str) -> set[str]:
    """Argument names of the TRL config class the method uses (for checking training.extra)."""
    import trl

    config_cls = getattr(trl, TRAINER_CONFIGS[method])
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
    "activation_checkpointing": "training.gradient_checkpointing",
    "optim": "training.optimizer",
    "output_dir": "output_dir",
    "max_length": "data.max_length",
    "router_aux_loss_coef": "moe.aux_loss_coef",
    "report_to": "tracking.backend",
    "save_strategy": "training.save_steps or training.save_minutes",
    "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit",
    "resume_from_checkpoint": "the automatic resume (run the same command again; --no-resume starts over)",
}
# ... and per method, the TRL arguments its section owns (every field of DpoSettings/KtoSettings bar init_adapter).
METHOD_OWNED_ARGS = {
    method: {name: f"{method}.{name}" for name in cls.model_fields if name != "init_adapter"}
    for method, cls in (("dpo", DpoSettings), ("kto", KtoSettings))
}


def extra_problems(data: dict[str, Any]) -> list[str]:
    """Names in training.extra (raw recipe) that TRL's config for the method does not take, or the schema owns."""
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    extra = training.get("extra")
    if not isinstance(extra, dict):
        return []
    method = data.get("method", "sft")
    method = method if method in TRAINER_CONFIGS else "sft"  # an unknown method is reported by the schema
    fields = trainer_config_fields(method)
    owned = {**OWNED_TRAINER_ARGS, **METHOD_OWNED_ARGS.get(method, {})}
    problems = []
    for name, value in extra.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"training.extra.{name}: got {value}; give a finite number")
        if name in owned:
            problems.append(f"training.extra.{name}: set by the recipe; use {owned[name]} instead")
        elif name not in fields:
            hint = closest(str(name), sorted(fields))
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            problems.append(f"training.extra.{name}: not an argument of trl.{TRAINER_CONFIGS[method]}{suggestion}")
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
        raise blame_overrides(path, problems, overrides)  # a bad --set value is named as the flag, not the file
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in (what `validate` prints and runs save).

    Only the method's own section is written (dpo: for dpo, kto: for kto, neither for sft): the dump is itself
    a valid recipe, and a section of another method would be refused.
    """
    data = recipe.model_dump(mode="json")
    for section in METHOD_SECTIONS:
        if section != recipe.method:
            del data[section]
    if data.get("evaluation") is None:
        del data["evaluation"]  # optional section: written only when the recipe has it
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
