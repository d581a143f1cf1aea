"""The `finetune` command: one function per subcommand, each a thin call into the package.

Bad input (UserError, including data_tools' DataError) prints one line per problem and exits 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from finetune.cli_options import (
    GenAdapter,
    GenChatFormat,
    GenMaxTokens,
    GenModel,
    GenQuantization,
    GenSeed,
    GenSystem,
    GenTemperature,
    GenTopP,
    SetOption,
)
from finetune.errors import UserError
from finetune.quiet import install as silence_known_noise

silence_known_noise()  # before any library import that emits it (bitsandbytes logs at import)

app = typer.Typer(
    help="LoRA/QLoRA fine-tuning for Mixtral-architecture MoE models, with real 4-bit experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(error: Exception) -> None:
    """Print a user error to stderr and exit 2 (in a rank of `--num-processes`, the launching process prints it)."""
    from finetune.train.launch import report_to_launcher

    if not report_to_launcher(error):
        typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in output_dir")] = False,
    force: Annotated[bool, typer.Option(help="Train even when `finetune plan` predicts the GPU is too small")] = False,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Delete output_dir's checkpoints and start over instead of resuming")
    ] = False,
    num_processes: Annotated[
        int | None, typer.Option(help="Train on N processes: re-run this command under `accelerate launch`")
    ] = None,
    accelerate_config: Annotated[
        Path | None,
        typer.Option(
            help="accelerate config file for the launch (default: accelerate_config.yaml; CPU: accelerate/cpu-ddp.yaml)"
        ),
    ] = None,
) -> None:
    """Train: load the model in the recipe's quantisation, attach LoRA, run TRL's trainer, save the adapter.

    Rerun on an interrupted output_dir to resume from its newest checkpoint. SIGTERM/SIGINT save a checkpoint and
    exit with 128 + the signal number (143, 130)."""
    from finetune.train.interrupt import Interrupted

    if num_processes is not None or accelerate_config is not None:
        relaunch(recipe, set_ or [], num_processes, accelerate_config, overwrite=overwrite, resume=not no_resume)
    try:
        from finetune.recipe.schema import load_recipe
        from finetune.train.run import run as run_recipe

        loaded = load_recipe(recipe, set_ or [])
        metrics = run_recipe(loaded, overwrite=overwrite, force=force, resume=not no_resume)
    except UserError as e:  # DataError is one too
        fail(e)
        return
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code) from None
    from finetune.distributed.ranks import is_main_process
    from finetune.tracking.console import summary_lines

    for line in summary_lines(metrics, loaded) if is_main_process() else []:  # one summary, from rank 0
        typer.echo(line)


def relaunch(
    recipe: Path, sets: list[str], num_processes: int | None, config: Path | None, *, overwrite: bool, resume: bool
) -> None:
    """Check the launch and the recipe once, here, then run this command again under `accelerate launch`."""
    from finetune.recipe.schema import load_recipe
    from finetune.train import launch
    from finetune.train.preflight import check

    try:
        command = launch.prepare(sys.argv[1:], num_processes, config)
        check(load_recipe(recipe, sets), overwrite=overwrite, resume=resume)  # one error here, not one per rank
    except UserError as e:
        fail(e)
    raise typer.Exit(launch.run(command, echo=typer.echo))


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    set_: SetOption = None,
    explain: Annotated[bool, typer.Option("--explain", help="Describe every recipe key")] = False,
    overwrite: Annotated[bool, typer.Option(help="As for run: accept an output_dir holding a finished run")] = False,
    data_check: Annotated[
        bool,
        typer.Option(
            "--data-check/--no-data-check",
            help="Read and check every local data record as run does (bad ones as FILE:LINE); --no-data-check skips "
            "that for very large data (the file checks still run)",
        ),
    ] = True,
) -> None:
    """Check a recipe completely (no model is loaded; every data record is read) and print it with every default
    resolved, also when the recipe is refused."""
    from finetune.recipe.reader import run_length_notes
    from finetune.recipe.schema import Recipe, dump_recipe, load_recipe
    from finetune.train.preflight import check

    if explain:
        from finetune.tracking.console import print_explain

        print_explain(Recipe)  # fits the terminal's width
    try:
        loaded = load_recipe(recipe, set_ or [])
    except UserError as e:
        fail(e)
        return
    try:
        check(loaded, overwrite=overwrite, records=data_check)  # the refusals `run` makes, from the same place
    except UserError as e:  # DataError is one too
        typer.echo(f"error: {e}", err=True)
        typer.echo(f"# {recipe}: refused (see the error); the recipe as resolved:")  # still worth reading
        typer.echo(run_length_notes(dump_recipe(loaded), loaded.training), nl=False)
        raise typer.Exit(2) from None
    typer.echo(run_length_notes(dump_recipe(loaded), loaded.training), nl=False)  # what sets the run's length
    typer.echo(f"# {recipe}: valid", err=True)


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    set_: SetOption = None,
    gpu: Annotated[
        str | None, typer.Option(help="GPU from the table, e.g. H100, A100-40, RTX4090, L40S (default: H100, said)")
    ] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(help="Memory per GPU, e.g. 24GB; alone it gives no time (a card's speed needs --gpu NAME)"),
    ] = None,
    num_gpus: Annotated[int, typer.Option(min=1, help="GPUs; more than one plans FSDP2 sharding")] = 1,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table")] = False,
) -> None:
    """Predict memory per GPU and time from the recipe and the model's config.json alone (no weights)."""
    import json

    from finetune.plan.estimate import make_plan
    from finetune.plan.gpus import choose_gpu
    from finetune.plan.render import render
    from finetune.recipe.schema import load_recipe

    try:
        card, gpu_note = choose_gpu(gpu, gpu_memory)  # the note says which card was assumed when none was named
        result = make_plan(load_recipe(recipe, set_ or []), card, num_gpus=num_gpus, gpu_note=gpu_note)
    except UserError as e:
        fail(e)
        return
    typer.echo(json.dumps(result, indent=2, default=str) if json_ else render(result))


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
    from finetune.model.tiny import TinySpec, write_tiny_model

    if (output / "config.json").exists() and not overwrite:
        fail(ValueError(f"{output} already holds a model; pass --overwrite or choose another folder"))
    if top_k > experts or hidden_size % heads or heads % kv_heads:
        fail(ValueError("need top_k <= experts, hidden_size divisible by heads, heads divisible by kv_heads"))
    spec = TinySpec(hidden_size, intermediate_size, layers, experts, top_k, heads, kv_heads, seed)
    write_tiny_model(output, spec)
    typer.echo(f"wrote {output}")


@app.command()
def merge(
    source: Annotated[Path, typer.Argument(help="A finished run folder, or its adapter/ folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged checkpoint")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's, else the run's recipe)")] = None,
    onto: Annotated[
        str, typer.Option(help="original: the 16-bit weights; dequantized: dequant(quant(W))")
    ] = "original",
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32 | auto (keep the base's)")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB")] = "5GB",
    verify: Annotated[bool, typer.Option(help="Compare merged and unmerged logits (on by default)")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT folder")] = False,
) -> None:
    """Merge a run's adapter into its base, shard by shard, in the base's own layout; verified by logits."""
    from finetune.export.merge_run import MergeVerificationError
    from finetune.export.merge_run import merge as merge_adapter

    try:
        merge_adapter(source, output, base=base, onto=onto, dtype=dtype, max_shard_size=max_shard_size,
                      verify=verify, overwrite=overwrite, echo=typer.echo)  # fmt: skip
    except UserError as e:
        fail(e)
    except MergeVerificationError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("export-adapter")
def export_adapter(
    source: Annotated[Path, typer.Argument(help="A finished run folder, or its adapter/ folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the exported adapter")],
    layout: Annotated[str, typer.Option(help="per-expert: a LoRA pair per expert and w1/w2/w3")] = "per-expert",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT folder")] = False,
) -> None:
    """Write the adapter in the layout serving engines expect; stock PEFT reads it too."""
    from finetune.export.adapters import export_adapter as export
    from finetune.export.adapters import summary_lines

    try:
        summary = export(source, output, layout=layout, overwrite=overwrite)
    except UserError as e:
        fail(e)
        return
    for line in summary_lines(summary):
        typer.echo(line)


@app.command("export-gguf")
def export_gguf(
    source: Annotated[Path, typer.Argument(help="A run folder, its adapter/ folder, or a merged model folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file to write")],
    type_: Annotated[str, typer.Option("--type", help="f16 | bf16 | q8_0 | q4_0 | q4_k_m (llama-quantize)")] = "f16",
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's, else the run's recipe)")] = None,
    onto: Annotated[str, typer.Option(help="original (16-bit weights) | dequantized (dequant(quant(W)))")] = "original",
    verify: Annotated[bool, typer.Option(help="Read the file back against the merged weights (on by default)")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing FILE")] = False,
) -> None:
    """Merge and stream the model into one GGUF file for llama.cpp and Ollama (with an Ollama Modelfile beside it)."""
    from finetune.export.gguf_export import GGUFVerificationError
    from finetune.export.gguf_export import export_gguf as export

    try:
        export(source, output, out_type=type_, base=base, onto=onto, overwrite=overwrite, verify=verify,
               echo=typer.echo)  # fmt: skip
    except UserError as e:
        fail(e)
    except GGUFVerificationError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def generate(
    model: GenModel,
    prompt: Annotated[str, typer.Option(help="The user message")],
    adapter: GenAdapter = None,
    quantization: GenQuantization = "auto",
    chat_format: GenChatFormat = "auto",
    system: GenSystem = None,
    max_new_tokens: GenMaxTokens = 256,
    temperature: GenTemperature = 0.7,
    top_p: GenTopP = 0.95,
    seed: GenSeed = None,
) -> None:
    """Reply to one prompt, streamed, in the chat format the model was trained with (GPU bf16 if present, else CPU fp32)."""
    from finetune.export.generate import Sampling, resolve_source, run_generate

    try:
        source = resolve_source(model, adapter, quantization, chat_format, system)
        run_generate(source, prompt, Sampling(max_new_tokens, temperature, top_p, seed))
    except UserError as e:
        fail(e)


@app.command()
def chat(
    model: GenModel,
    adapter: GenAdapter = None,
    quantization: GenQuantization = "auto",
    chat_format: GenChatFormat = "auto",
    system: GenSystem = None,
    max_new_tokens: GenMaxTokens = 256,
    temperature: GenTemperature = 0.7,
    top_p: GenTopP = 0.95,
    seed: GenSeed = None,
) -> None:
    """Chat on stdin/stdout, keeping the conversation; /reset clears it, /exit or EOF ends (works with piped stdin)."""
    from finetune.export.generate import Sampling, resolve_source, run_chat

    try:
        source = resolve_source(model, adapter, quantization, chat_format, system)
        run_chat(source, Sampling(max_new_tokens, temperature, top_p, seed))
    except UserError as e:
        fail(e)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run's output folder (holds metrics.jsonl)")],
    other: Annotated[Path | None, typer.Argument(help="A second run folder: its curves are overlaid")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for the PNGs and report.md")] = None,
) -> None:
    """Render the run's curves, expert-load heatmaps and samples as PNGs and a one-page report.md."""
    from finetune.tracking.report import write_report

    try:
        out = write_report([run_dir, *([other] if other else [])], output)
    except UserError as e:
        fail(e)
        return
    typer.echo(f"report: {out / 'report.md'}")


@app.command("eval")
def eval_(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A finished run folder (its base, adapter, eval split)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model folder or hub id, instead of RUN_DIR")] = None,
    adapter: GenAdapter = None,
    data: Annotated[list[str] | None, typer.Option(help="Held-out perplexity on this data file (repeatable)")] = None,
    generation: Annotated[
        list[str] | None, typer.Option(help="JSONL of {prompt or messages, reference}: generation metrics (repeatable)")
    ] = None,
    tasks: Annotated[
        list[str] | None, typer.Option(help="lm-eval task names or task YAML files/folders (repeatable, or a,b)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Folder for eval.json (default: RUN_DIR)")
    ] = None,
    quantization: GenQuantization = "auto",
    chat_format: GenChatFormat = "auto",
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Most new tokens per generated reply")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Records per forward pass")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N records of each file and task")] = None,
    bootstrap: Annotated[int | None, typer.Option(min=0, help="Bootstrap resamples for the 95% interval")] = None,
    routing: Annotated[bool | None, typer.Option("--routing/--no-routing", help="Measure the routing shift")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing eval.json")] = False,
) -> None:
    """Base against adapter from one model load: held-out perplexity, generation metrics, lm-eval tasks, routing."""
    from finetune.evaluate.inputs import EvalRequest
    from finetune.evaluate.run_eval import run_cli
    from finetune.tracking.eval_table import render

    request = EvalRequest(
        run_dir=run_dir, model=model, adapter=adapter, data=data or [], generation=generation or [],
        tasks=[t for entry in tasks or [] for t in entry.split(",") if t.strip()], output=output,
        quantization=quantization, chat_format=chat_format, max_new_tokens=max_new_tokens, batch_size=batch_size,
        limit=limit, bootstrap_samples=bootstrap, routing=routing, overwrite=overwrite,
    )  # fmt: skip
    try:
        result, written = run_cli(request, echo=lambda line: typer.echo(line, err=True))
    except UserError as e:
        fail(e)
        return
    for line in render(result):
        typer.echo(line)
    typer.echo(f"eval: {', '.join(str(p) for p in written)}", err=True)


from finetune.cli_data import app as data_app  # noqa: E402  (its commands are thin too: imports inside each)

app.add_typer(data_app, name="data", help="Prepare data: convert, validate, inspect, tokenize, split, dedupe")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
