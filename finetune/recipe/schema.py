"""The typed recipe: one YAML file gives every setting of one run.

`load_recipe(path, overrides)` reads YAML, applies `--set key=value` overrides, validates the whole tree
with pydantic and reports every problem at once (dotted key path, what was given, what is accepted),
before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from data_tools.config import DataConfig
from finetune.recipe.errors import closest, format_validation_error, path_problems
from finetune.recipe.evaluation import EvaluationSettings
from finetune.recipe.preference import DpoSettings, KtoSettings
from finetune.recipe.reader import apply_overrides, blame_overrides, read_yaml
from finetune.recipe.sections import (
    LoraSettings,
    ModelSettings,
    MoeSettings,
    Strict,
    TrackingSettings,
    TrainingSettings,
)

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
