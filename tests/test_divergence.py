"""A run whose loss turns NaN/inf stops with a clear error and writes no adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState

from finetune.errors import UserError
from finetune.recipe.schema import load_recipe
from finetune.train.divergence import DivergenceGuard

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("logs", [{"loss": math.nan}, {"grad_norm": math.inf}, {"eval_loss": -math.inf}])
def test_guard_stops_training_and_skips_the_save(logs):
    guard, control, state = DivergenceGuard(), TrainerControl(), TrainerState(global_step=7)
    control.should_save = True
    guard.on_log(None, state, control, logs={"learning_rate": 1e-3, **logs})
    assert control.should_training_stop and not control.should_save
    assert "step 7" in guard.problem
    with pytest.raises(UserError, match="training diverged"):
        guard.check(torch.nn.Linear(2, 2))


def test_guard_passes_finite_logs_and_catches_nan_weights():
    guard, control = DivergenceGuard(), TrainerControl()
    guard.on_log(None, TrainerState(global_step=1), control, logs={"loss": 1.5, "grad_norm": 0.3})
    assert not control.should_training_stop
    layer = torch.nn.Linear(2, 2)
    guard.check(layer)  # finite: no error
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    with pytest.raises(UserError, match="adapter tensors hold NaN"):
        guard.check(layer)


def test_diverging_run_writes_no_adapter(tmp_path, tiny_model_dir):
    """A learning rate far past sane (the schema refuses it; forced here) blows the loss up mid-run."""
    import finetune.train.run as train_mod

    out = tmp_path / "out"
    recipe = load_recipe(
        ROOT / "recipes" / "tiny-mixtral-sft.yaml",
        [f"model.path={tiny_model_dir}", f"output_dir={out}", "training.max_steps=8", "training.logging_steps=1"],
    )
    object.__setattr__(recipe.training, "learning_rate", 1e30)
    with pytest.raises(UserError, match="training diverged") as caught:
        train_mod.run(recipe)
    assert "learning_rate" in str(caught.value)
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
