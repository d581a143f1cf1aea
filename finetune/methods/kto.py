"""Kahneman-Tversky optimisation: TRL's KTOTrainer on unpaired desirable/undesirable completions."""

from __future__ import annotations

from typing import Any

from finetune.methods import preference
from finetune.methods.preference import SUMMARY_KEYS, reference_arguments, show_first_record

__all__ = ["SUMMARY_KEYS", "build_trainer", "show_first_record"]


def config_arguments(settings) -> dict[str, Any]:
    """The recipe's `kto:` section as KTOConfig arguments."""
    return {
        **reference_arguments(settings),
        "loss_type": settings.loss_type,
        "desirable_weight": settings.desirable_weight,
        "undesirable_weight": settings.undesirable_weight,
    }


def build_trainer(recipe, model, tokenizer, prepared, args: dict[str, Any], callbacks: list):
    from trl import KTOConfig, KTOTrainer

    from finetune.recipe import method_settings

    settings = config_arguments(method_settings(recipe))
    return preference.build_trainer(KTOTrainer, KTOConfig, settings, model, tokenizer, prepared, args, callbacks)
