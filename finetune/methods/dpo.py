"""Direct preference optimisation: TRL's DPOTrainer on data_tools' tokenised pairs, reference = the frozen adapter."""

from __future__ import annotations

from typing import Any

from finetune.methods import preference
from finetune.methods.preference import SUMMARY_KEYS, reference_arguments, show_first_record

__all__ = ["SUMMARY_KEYS", "build_trainer", "show_first_record"]


def config_arguments(settings) -> dict[str, Any]:
    """The recipe's `dpo:` section as DPOConfig arguments."""
    return {
        **reference_arguments(settings),
        "loss_type": list(settings.loss_type),
        "loss_weights": settings.loss_weights,
        "label_smoothing": settings.label_smoothing,
        "f_divergence_type": settings.f_divergence_type,
        "use_weighting": settings.use_weighting,
        "ld_alpha": settings.ld_alpha,
    }


def build_trainer(recipe, model, tokenizer, prepared, args: dict[str, Any], callbacks: list):
    from trl import DPOConfig, DPOTrainer

    from finetune.recipe import method_settings

    settings = config_arguments(method_settings(recipe))
    return preference.build_trainer(DPOTrainer, DPOConfig, settings, model, tokenizer, prepared, args, callbacks)
