"""Supervised fine-tuning: TRL's SFTTrainer on data_tools' tokenised (and possibly packed) rows."""

from __future__ import annotations

from typing import Any

SUMMARY_KEYS = ("mean_token_accuracy", "entropy")


def build_trainer(recipe, model, tokenizer, prepared, args: dict[str, Any], callbacks: list):
    from trl import SFTConfig, SFTTrainer

    from finetune.distributed.sharding import GatheredAdapterSave

    class Trainer(GatheredAdapterSave, SFTTrainer):
        """SFTTrainer whose FSDP2 checkpoints gather only the adapter, and whose eval_loss is the LM loss alone."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """TRL adds router_aux_loss_coef x aux to the loss it reports in evaluation too; a held-out loss must be
            the language-model loss alone. The aux loss is still computed and logged (eval_aux_loss)."""
            if self.model.training or not self.aux_loss_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            coef, self.router_aux_loss_coef = self.router_aux_loss_coef, 0.0
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.router_aux_loss_coef = coef

    return Trainer(
        model=model,
        args=SFTConfig(**args),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def show_first_record(dataset, tokenizer) -> None:
    """Print the first training record with its loss mask, so every run shows what it trains on."""
    from rich.console import Console

    from data_tools.preview import LEGEND, first_sample, mask_text

    if len(dataset) == 0:
        return
    ids, labels = first_sample(dataset[0])
    console = Console()
    console.print(f"first training record ({len(ids)} tokens, {sum(x != -100 for x in labels)} trained):")
    console.print(mask_text(ids, labels, tokenizer))
    console.print(LEGEND)
