"""What `finetune eval` evaluates, resolved and checked before the model loads: the model and adapter, the chat format
and loss mask of the run, the settings (the run recipe's `evaluation:` section, then the flags), and every input
read and tokenised. A bad input stops here, with nothing loaded and nothing written."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe.evaluation import EvaluationSettings

EVAL_FILE = "eval.json"


@dataclass
class EvalRequest:
    """The command line of `finetune eval` (None: not given, so the run's recipe or the default decides)."""

    run_dir: Path | None = None
    model: str | None = None
    adapter: Path | None = None
    data: list[str] = field(default_factory=list)
    generation: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    output: Path | None = None
    quantization: str = "auto"
    chat_format: str = "auto"
    max_new_tokens: int | None = None
    batch_size: int | None = None
    limit: int | None = None
    bootstrap_samples: int | None = None
    routing: bool | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class EvalInputs:
    """Everything the evaluation needs besides the model: prepared before it loads."""

    source: Any  # finetune.export.generate.Source: model, adapter, quantisation, chat format
    settings: EvaluationSettings
    out_dir: Path
    recipe: Any = None  # the run's Recipe, when evaluating a run folder (its tracking names the W&B run)
    perplexity: list[Any] = field(default_factory=list)  # perplexity.TokenizedSet
    generation: dict[str, list[Any]] = field(default_factory=dict)  # name → generation_tasks.GenerationRecord
    tasks: list[Any] = field(default_factory=list)  # lm_eval_tasks.TaskSpec


def settings_for(request: EvalRequest, recipe: Any) -> EvaluationSettings:
    """The run recipe's evaluation section (or the defaults), with every flag given on the command line on top."""
    base = getattr(recipe, "evaluation", None) or EvaluationSettings()
    lists = {k: v for k in ("data", "generation", "tasks") if (v := getattr(request, k))}
    scalars = ("max_new_tokens", "batch_size", "limit", "bootstrap_samples", "routing")
    given = {k: getattr(request, k) for k in scalars if getattr(request, k) is not None}
    try:
        return EvaluationSettings.model_validate({**base.model_dump(), **lists, **given})
    except ValueError as e:
        raise UserError(f"finetune eval: {str(e).splitlines()[-1]}") from None


def _run_recipe(run_dir: Path) -> Any:
    from finetune.recipe.schema import load_recipe

    try:
        return load_recipe(run_dir / "recipe.yaml")
    except UserError as e:
        first = e.problems[0] if e.problems else e.message
        raise UserError(f"{run_dir / 'recipe.yaml'}: the run's recipe does not load ({first})") from None


def resolve(request: EvalRequest) -> EvalInputs:
    """Check the command line and everything it names; raises one UserError listing every problem."""
    from finetune.evaluate.checks import FLAG_KEYS, adapter_base_problem, settings_problems
    from finetune.export.generate import resolve_source

    if (request.run_dir is None) == (request.model is None):
        raise UserError("finetune eval: give a run folder (RUN_DIR) or --model PATH, not both and not neither")
    recipe = None
    if request.run_dir is not None:
        run_dir = request.run_dir.expanduser()
        if not (run_dir / "recipe.yaml").is_file():
            raise UserError(f"RUN_DIR: {run_dir} has no recipe.yaml; give a finished run's folder, or --model PATH")
        if request.adapter is not None:
            raise UserError(f"RUN_DIR {run_dir} brings its own adapter; drop --adapter (or use --model and --adapter)")
        recipe = _run_recipe(run_dir)
        source = resolve_source(str(run_dir), None, request.quantization, request.chat_format)
    else:
        source = resolve_source(request.model, request.adapter, request.quantization, request.chat_format)
    settings = settings_for(request, recipe)
    out_dir = (request.output or request.run_dir or Path.cwd()).expanduser()
    problems = []
    if (out_dir / EVAL_FILE).exists() and not request.overwrite:
        problems.append(f"-o: {out_dir / EVAL_FILE} exists; pass --overwrite to replace it, or -o another folder")
    if out_dir.exists() and not out_dir.is_dir():
        problems.append(f"-o: {out_dir} is a file; give a folder for eval.json")
    if source.adapter_dir is not None and (source.model_dir / "config.json").is_file():
        problem = adapter_base_problem(source.model_dir, source.adapter_dir)
        if problem:
            problems.append(problem)
    problems += settings_problems(settings, FLAG_KEYS)
    eval_split = recipe is not None and recipe.method == "sft" and (recipe.data.eval or recipe.data.eval_fraction)
    if not (settings.data or settings.generation or settings.tasks or eval_split):
        problems.append(
            "finetune eval: nothing to evaluate; give --data FILE (held-out perplexity), --generation FILE or --tasks"
            + ("" if recipe is None else f" (the run in {request.run_dir} has no eval split)")
        )
    if problems:
        raise UserError(problems[0]) if len(problems) == 1 else UserError(f"{len(problems)} problems", problems)
    return EvalInputs(source, settings, out_dir, recipe)


def data_settings(inputs: EvalInputs) -> Any:
    """The data section that formats and masks the records: the run's own, or the model folder's chat format."""
    from data_tools.config import DataConfig

    if inputs.recipe is not None:
        return inputs.recipe.data
    src = inputs.source
    return DataConfig(
        train=[{"path": "-"}], chat_format=src.chat_format, chat_template=src.chat_template,
        system_prompt=src.system_prompt,
    )  # fmt: skip


def prepare(inputs: EvalInputs, tokenizer: Any, eval_rows: Any = None) -> EvalInputs:
    """Tokenise the perplexity data (the run's eval split by default, `eval_rows` when the caller holds it already),
    read the generation files, resolve the tasks."""
    from data_tools.pipeline import format_spec
    from data_tools.prepare import prepare_data
    from finetune.evaluate.generation_tasks import name_of, read_generation_file
    from finetune.evaluate.lm_eval_tasks import resolve_tasks
    from finetune.evaluate.perplexity import from_rows, tokenize_file

    settings, cfg = inputs.settings, data_settings(inputs)
    spec = format_spec(cfg, tokenizer, inputs.source.model_dir)
    sets = [tokenize_file(path, spec, tokenizer, cfg.max_length, settings.limit) for path in settings.data]
    if not settings.data and eval_rows is not None:
        sets.append(from_rows("eval_split", eval_rows, settings.limit))
    elif not settings.data and inputs.recipe is not None and inputs.recipe.method == "sft":
        recipe = inputs.recipe
        prepared = prepare_data(recipe.data, tokenizer, model_dir=inputs.source.model_dir, seed=recipe.training.seed,
                                method="sft", echo=lambda *_: None)  # fmt: skip
        if prepared.eval is not None:
            sets.append(from_rows("eval_split", prepared.eval, settings.limit))
    generation = {name_of(p): read_generation_file(p, settings.limit)[0] for p in settings.generation}
    tasks = resolve_tasks(settings.tasks)[0]
    return replace(inputs, perplexity=[s for s in sets if len(s)], generation=generation, tasks=tasks)
