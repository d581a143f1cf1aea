"""What DPO and KTO share: the reference policy, the pre-tokenised data hand-off, and the first-record display.

The reference is the same quantised model: TRL copies the adapter being trained into a frozen "ref" adapter
(`MixtralPeftModel` extends that to the experts) and switches to it for the reference pass. A fresh adapter starts
with B = 0, so the reference is the base; with `init_adapter` it is base + that adapter. No second base is loaded.
"""

from __future__ import annotations

from typing import Any

SUMMARY_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def show_first_record(dataset, tokenizer) -> None:
    """Print the first training record with its loss mask, as SFT's does: the header says what is trained in words
    (no colour needed) and the legend says how it shows, highlighted on a terminal or between « » when piped."""
    from rich.console import Console

    from data_tools.preview import LEGEND, preference_view

    if len(dataset) == 0:
        return
    row = dataset[0]
    sides = ("chosen", "rejected") if "chosen_ids" in row else ("completion",)
    counts = ", ".join(f"{side} {len(row[f'{side}_ids'])}" for side in sides)
    console = Console()
    console.print(f"first training record (prompt {len(row['prompt_ids'])} tokens, no loss; {counts} trained):")
    console.print(preference_view(row, tokenizer))
    console.print(LEGEND)


def build_trainer(
    trainer_cls, config_cls, config_arguments: dict[str, Any], model, tokenizer, prepared, args, callbacks
):
    """TRL's DPO/KTO trainer taking data_tools' ids as they are: TRL 1.16 always re-tokenises in `_prepare_dataset`
    with the chat template, which is not mistral-common's format, so that one method is replaced (and FSDP2
    checkpoints gather only the adapter, `GatheredAdapterSave`)."""
    from data_tools.preference import trl_ready
    from finetune.distributed.sharding import GatheredAdapterSave

    class Pretokenized(GatheredAdapterSave, trainer_cls):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return trl_ready(dataset, args)

    return Pretokenized(
        model=model,
        args=config_cls(**args, **config_arguments),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
