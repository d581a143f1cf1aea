"""Kahneman-Tversky optimisation: TRL's KTOTrainer on unpaired desirable/undesirable completions."""

from __future__ import annotations

from typing import Any

from finetune.train.methods import preference
from finetune.train.methods.preference import SUMMARY_KEYS, show_first_record

__all__ = ["SUMMARY_KEYS", "build_trainer", "show_first_record"]


def build_trainer(recipe, model, tokenizer, prepared, args: dict[str, Any], callbacks: list):
    """The recipe's `kto:` section keys are KTOConfig's own argument names (beta, desirable_weight, ...)."""
    from trl import KTOConfig, KTOTrainer

    from finetune.recipe.schema import method_config_arguments

    section = method_config_arguments(recipe)
    return preference.build_trainer(KTOTrainer, KTOConfig, section, model, tokenizer, prepared, args, callbacks)
