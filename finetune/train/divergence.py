"""Stop a run whose loss or adapter weights stop being finite, instead of saving a NaN adapter.

An infinite learning rate, fp16 overflow or corrupt data shows up as a NaN/inf loss or gradient norm. The trainer
would carry on and write an adapter full of NaN; we stop at the logging step that shows it, skip the save that
would follow, and report one clear error.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from finetune.errors import UserError

WATCHED = ("loss", "grad_norm", "eval_loss")


class DivergenceGuard(TrainerCallback):
    """A TrainerCallback that records the first non-finite loss or gradient norm and ends training there."""

    def __init__(self) -> None:
        self.problem: str | None = None

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        for key in WATCHED:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value) and self.problem is None:
                self.problem = f"{key} became {value} at step {state.global_step}"
        if self.problem:
            control.should_training_stop = True
            control.should_save = False  # a checkpoint of NaN weights is worse than none
            control.should_evaluate = False

    def check(self, model: Any) -> None:
        """Raise if training diverged or any trainable weight is not finite; nothing has been saved yet."""
        if self.problem is None:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.detach().isfinite().all()]
            if bad:
                self.problem = f"{len(bad)} adapter tensors hold NaN/inf (first: {bad[0]})"
        if self.problem:
            raise UserError(
                f"training diverged: {self.problem}; no adapter was written. Lower training.learning_rate, "
                "keep training.max_grad_norm on, or use dtype float32/bfloat16 instead of float16"
            )
