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


def reference_arguments(settings) -> dict[str, Any]:
    """The reference-policy options both TRL configs take."""
    return {"precompute_ref_log_probs": settings.precompute_ref_log_probs, "beta": settings.beta}
