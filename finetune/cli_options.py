"""Option types shared by several commands: recipe overrides, and how generate, chat and eval pick a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set training.max_steps=10 (repeatable)"),
]

GenModel = Annotated[
    str,
    typer.Option("--model", help="Model or merged folder, run folder (base + adapter), hub id, tiny-random-mixtral"),
]
GenAdapter = Annotated[Path | None, typer.Option(help="PEFT adapter folder (RUN/adapter) to put on --model")]
GenQuantization = Annotated[
    str,
    typer.Option(
        help="auto | nf4 | fp4 | int8 | none. auto: a run folder's own setting; nf4 with --adapter (the base a QLoRA "
        "adapter was trained on); none for a plain or merged folder"
    ),
]
GenChatFormat = Annotated[
    str,
    typer.Option(help="auto | mistral | chatml | template; auto: the run's, or mistral if there is tokenizer.model"),
]
GenSystem = Annotated[str | None, typer.Option(help="System prompt (default: the run recipe's data.system_prompt)")]
GenMaxTokens = Annotated[int, typer.Option(min=1, help="Most tokens to generate per reply")]
GenTemperature = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy (reproducible)")]
GenTopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0)")]
GenSeed = Annotated[int | None, typer.Option(help="Seed for sampling (default: random)")]
