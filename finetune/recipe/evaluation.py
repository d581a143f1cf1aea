"""The recipe's optional `evaluation:` section: what `finetune run` evaluates after training (as `finetune eval`).

Its own module so that recipe.py stays small; the checks that look at the files and tasks it names (they exist,
parse, have references, lm-eval knows the task) are `finetune.evaluate.checks`, run by `finetune validate`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EvaluationSettings(BaseModel):
    """`evaluation:`: held-out perplexity, generation metrics, lm-eval tasks and routing shift, base vs adapter."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    data: list[str] = Field(
        default_factory=list,
        description="Held-out perplexity on these data files (any format the data tools read); empty: the run's "
        "own eval split",
    )
    generation: list[str] = Field(
        default_factory=list,
        description="JSONL files of {prompt or messages, reference}: greedy replies scored by exact match, "
        "contains, ROUGE-L and chrF",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness task names or task YAML files/folders (needs pip install 'finetune[eval]')",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Most new tokens per generated reply")
    batch_size: int = Field(8, ge=1, le=4096, description="Records per forward pass (perplexity, generation, lm-eval)")
    limit: int | None = Field(
        None, ge=1, le=10**9, description="Evaluate at most this many records of each file and task (none: all)"
    )
    bootstrap_samples: int = Field(
        1000, ge=0, le=10**6, description="Resamples for the 95% interval of base - adapter NLL (0: no interval)"
    )
    routing: bool = Field(True, description="Measure how the adapter changed the router on the perplexity data")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the bootstrap and of lm-eval")

    @field_validator("data", "generation", "tasks")
    @classmethod
    def _no_empty_entries(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("has an empty entry; give a file path (or a task name)")
        return value
