"""Direct preference optimisation: TRL's DPOTrainer on data_tools' tokenised pairs, reference = the frozen adapter."""

from __future__ import annotations

from typing import Any

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

    from data_tools.preference import trl_ready
    from finetune.recipe import method_settings

    class PretokenizedDPOTrainer(DPOTrainer):
        """data_tools tokenises exactly as mistral-common does; TRL would re-tokenise with the chat template."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return trl_ready(dataset, args)

    return PretokenizedDPOTrainer(
        model=model,
        args=DPOConfig(**args, **config_arguments(method_settings(recipe))),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
