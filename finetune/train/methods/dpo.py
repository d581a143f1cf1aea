"""Direct preference optimisation: TRL's DPOTrainer on data_tools' tokenised pairs, reference = the frozen adapter."""

from __future__ import annotations

from typing import Any

from finetune.train.methods import preference
from finetune.train.methods.preference import SUMMARY_KEYS, show_first_record

__all__ = ["SUMMARY_KEYS", "build_trainer", "show_first_record"]


def build_trainer(recipe, model, tokenizer, prepared, args: dict[str, Any], callbacks: list):
    """The recipe's `dpo:` section keys are DPOConfig's own argument names (beta, loss_type, loss_weights, ...)."""
    from trl import DPOConfig, DPOTrainer

    from finetune.recipe.schema import method_config_arguments

    section = method_config_arguments(recipe)
    return preference.build_trainer(DPOTrainer, DPOConfig, section, model, tokenizer, prepared, args, callbacks)
