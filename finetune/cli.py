"""The `finetune` command: one function per subcommand, each a thin call into the package.

Bad input (UserError, including data_tools' DataError) prints one line per problem and exits 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from finetune.errors import UserError

app = typer.Typer(
    help="LoRA/QLoRA fine-tuning for Mixtral-architecture MoE models, with real 4-bit experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set training.max_steps=10 (repeatable)"),
]


def fail(error: Exception) -> None:
    """Print a user error to stderr and exit 2."""
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in output_dir")] = False,
) -> None:
    """Train: load the model in the recipe's quantisation, attach LoRA, run TRL's trainer, save the adapter."""
    try:
        from finetune.recipe import load_recipe
        from finetune.train import run as run_recipe

        loaded = load_recipe(recipe, set_ or [])
        metrics = run_recipe(loaded, overwrite=overwrite)
    except UserError as e:  # DataError is one too
        fail(e)
        return
    out = Path(loaded.output_dir)
    typer.echo(
        f"done: loss {metrics['first_loss']:.4f} -> {metrics['final_train_loss']:.4f} in {metrics['steps']} steps, "
        f"{metrics['tokens_per_second']:.0f} tokens/s"
    )
    typer.echo(f"adapter: {out / 'adapter'}")
    typer.echo(f"metrics: {out / 'metrics.json'}")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    set_: SetOption = None,
    explain: Annotated[bool, typer.Option("--explain", help="Describe every recipe key")] = False,
) -> None:
    """Check a recipe completely (no model or data is loaded) and print it with every default resolved."""
    from finetune.recipe import Recipe, dump_recipe, load_recipe

    if explain:
        from rich.console import Console
        from rich.table import Table

        from finetune.recipe_errors import explain as explain_rows

        table = Table("key", "type", "default", "description", show_lines=False)
        for row in explain_rows(Recipe):
            table.add_row(*row)
        Console(width=200).print(table)
    try:
        loaded = load_recipe(recipe, set_ or [])
    except UserError as e:  # DataError is one too
        fail(e)
        return
    typer.echo(dump_recipe(loaded), nl=False)
    typer.echo(f"# {recipe}: valid", err=True)


@app.command("tiny-model")
def tiny_model(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write")],
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="Write into a folder that already has a model")] = False,
) -> None:
    """Write a seeded random Mixtral plus the real Mixtral v1 tokenizer (offline, from mistral-common)."""
    from finetune.tiny import TinySpec, write_tiny_model

    if (output / "config.json").exists() and not overwrite:
        fail(ValueError(f"{output} already holds a model; pass --overwrite or choose another folder"))
    if top_k > experts or hidden_size % heads or heads % kv_heads:
        fail(ValueError("need top_k <= experts, hidden_size divisible by heads, heads divisible by kv_heads"))
    spec = TinySpec(hidden_size, intermediate_size, layers, experts, top_k, heads, kv_heads, seed)
    write_tiny_model(output, spec)
    typer.echo(f"wrote {output}")


def mount_data_commands() -> None:
    try:
        from finetune.cli_data import app as data_app
    except ImportError as e:  # keep the rest of the CLI usable if the data extras are broken
        print(f"warning: `finetune data` unavailable: {e}", file=sys.stderr)
        return
    app.add_typer(data_app, name="data", help="Prepare data: convert, validate, inspect, tokenize, split, dedupe")


mount_data_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
