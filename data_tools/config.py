"""The `data:` section of a recipe. The lead's recipe schema embeds `DataConfig` as is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FormatName = Literal[
    "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "hh_rlhf", "unpaired"
]


class SourceConfig(BaseModel):
    """One data source: a local file or folder, a hub dataset id, or a built-in sample (`builtin:tiny-chat`,
    `builtin:tiny-preference`, `builtin:tiny-unpaired`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(
        description="Local file/folder (jsonl, json, parquet, csv), hub dataset id, or builtin:tiny-chat|tiny-preference|tiny-unpaired"
    )
    format: FormatName = Field("auto", description="Record format; auto detects it from the first record's keys")
    split: str = Field("train", description="Split to read when path is a hub dataset id")
    weight: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Multiplier on this source's record count (2.0 repeats it twice, 0.5 takes half)",
    )
    samples: int | None = Field(None, gt=0, le=10**9, description="Exact number of records to draw from this source")

    @model_validator(mode="after")
    def _weight_or_samples(self) -> SourceConfig:
        if self.weight is not None and self.samples is not None:
            raise ValueError("set either weight or samples for a source, not both")
        return self


class DataConfig(BaseModel):
    """How training data is read, validated, formatted, masked and packed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    train: list[SourceConfig] = Field(min_length=1, description="Training sources, mixed by weight or sample count")
    eval: SourceConfig | None = Field(None, description="Evaluation source (optional)")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of training records held out for eval by content hash (0 = none)"
    )
    chat_format: Literal["mistral", "chatml", "template"] = Field(
        "mistral", description="mistral = mistral-common v1 instruct format; chatml; template = a Jinja chat template"
    )
    chat_template: str | None = Field(
        None, description="Jinja template text or a file path for chat_format=template (default: the tokenizer's own)"
    )
    system_prompt: str | None = Field(None, description="System prompt for conversations that have none")
    max_length: int = Field(
        2048, gt=0, le=2**20, description="Longest sequence in tokens; longer records are truncated"
    )
    packing: bool = Field(False, description="Pack several records per row (no attention across records)")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant = loss on assistant turns (+ their EOS) only; all = the whole sequence"
    )
    skip_invalid: bool = Field(False, description="Skip (and count) invalid records instead of stopping")
    shuffle_seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for mixing, sampling and shuffling the training records"
    )
    num_proc: int | None = Field(
        None, gt=0, le=1024, description="Worker processes for tokenisation (default: CPU count, max 8)"
    )

    @model_validator(mode="after")
    def _eval_source_or_fraction(self) -> DataConfig:
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set either data.eval or data.eval_fraction, not both")
        return self
