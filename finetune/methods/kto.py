"""Kahneman-Tversky optimisation: TRL's KTOTrainer on unpaired desirable/undesirable completions."""

from __future__ import annotations

from typing import Any

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

    from data_tools.preference import trl_ready
    from finetune.recipe import method_settings

    class PretokenizedKTOTrainer(KTOTrainer):
        """data_tools tokenises exactly as mistral-common does; TRL would re-tokenise with the chat template."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return trl_ready(dataset, args)

    return PretokenizedKTOTrainer(
        model=model,
        args=KTOConfig(**args, **config_arguments(method_settings(recipe))),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
