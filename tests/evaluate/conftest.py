"""Fixtures of the `finetune eval` tests: one tiny SFT run with an `evaluation:` section, and saved adapters on the
unquantised tiny model (so stock transformers + stock PEFT compute the same function)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import GENERATION_FILE, RUN_STEPS, SAMPLES, TASK, TINY_RECIPE, runner, sets

from finetune.cli import app
from finetune.moe import apply_lora, load_mixtral, save_adapter


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, tiny_model_dir) -> Path:
    """`finetune run` on the tiny recipe, which evaluates after training: eval split, generation file, local task."""
    out = tmp_path_factory.mktemp("eval-run") / "out"
    args = sets(
        f"model.path={tiny_model_dir}",
        f"output_dir={out}",
        f"training.max_steps={RUN_STEPS}",
        "training.logging_steps=4",
        "tracking.sample_prompts=0",
        f"evaluation.generation=[{GENERATION_FILE}]",
        f"evaluation.tasks=[{TASK}]",
        "evaluation.max_new_tokens=12",
    )
    result = runner.invoke(app, ["run", str(TINY_RECIPE), *args])
    assert result.exit_code == 0, result.output[-3000:]
    return out


def save_lora(model_dir: Path, out: Path, randomize=None, seed: int = 0) -> Path:
    """An adapter on the unquantised tiny model: attention, both expert projections and a trainable router."""
    base, _ = load_mixtral(model_dir, quantization="none", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4, train_router=True)  # fmt: skip
    if randomize is not None:
        randomize(model, seed)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir, tmp_path_factory, randomize_lora) -> Path:
    return save_lora(tiny_model_dir, tmp_path_factory.mktemp("random-adapter") / "adapter", randomize_lora)


@pytest.fixture(scope="session")
def zero_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A freshly initialised adapter: every B factor is zero and the router copy equals the router."""
    return save_lora(tiny_model_dir, tmp_path_factory.mktemp("zero-adapter") / "adapter")


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """The first 12 conversations of the tiny chat sample, as a held-out file."""
    lines = (SAMPLES / "tiny_chat.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
