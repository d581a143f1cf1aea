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
    from rich.console import Console

    from data_tools.preview import preference_view

    if len(dataset) == 0:
        return
    console = Console()
    console.print("first training record (prompt dim, no loss; completions highlighted):")
    console.print(preference_view(dataset[0], tokenizer))


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
