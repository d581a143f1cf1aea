"""Everything a recipe can be refused for before weights load, in one place that `validate` and `run` both call.

`load_recipe` checks the schema; `preflight` checks the world the recipe points at: the method is available, the
device exists, output_dir can be written, the model folder is a readable Mixtral with a tokenizer, every data source
has data of the kind the method trains on, a starting adapter (`dpo.init_adapter`) is an adapter, and the chat
template parses. It reads headers and small files only, never weights, and records only when asked (`validate`
reads every one, as `run` will), and writes nothing (the writability probe removes what it creates). Hub ids
cannot be checked offline and are left to load time; the built-in tiny model is accepted by name and not built
here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.model.load import (
    device_problem,
    load_tokenizer,
    local_model_dir,
    missing_folder_problem,
    model_dir_problems,
)
from finetune.recipe.schema import Recipe, method_settings

# What a finished run leaves (as finetune.train.run.FINISHED_MARKERS; not imported, as train pulls in the trainer stack).
FINISHED_MARKERS = ("metrics.json", "adapter")
# Methods `finetune run` can train today. When a method lands, this is the only line that changes.
AVAILABLE_METHODS = ("sft", "dpo", "kto")


def check(recipe: Recipe, *, overwrite: bool = False, resume: bool = True, records: bool = False) -> None:
    """Raise one UserError listing every problem `preflight` finds (with `records`, every data record's too)."""
    problems = preflight(recipe, overwrite=overwrite, resume=resume, records=records)
    if problems:
        raise UserError(f"{len(problems)} problem(s) found before loading the model", problems)


def preflight(recipe: Recipe, *, overwrite: bool = False, resume: bool = True, records: bool = False) -> list[str]:
    """Every problem that would stop `finetune run` before the weights load, one key-named line each.

    `records` (what `finetune validate` does) also reads every local record through the loader `run` uses, so a
    broken line is found here and not after the model folder is resolved; `run` itself reads them once, when it
    prepares the data."""
    from finetune.distributed.sharding import launch_problems
    from finetune.train.checkpoints import resume_problems
    from finetune.train.methods.kernels import fused_lm_head_problems

    problems = method_problems(recipe.method)
    problem = device_problem(recipe.model.device)
    if problem:
        problems.append(problem)
    problems += output_dir_problems(recipe.output_dir, overwrite=overwrite)
    problems += resume_problems(recipe, resume=resume)  # a resume from a checkpoint of a different recipe
    problems += launch_problems(recipe)  # what FSDP2 cannot shard, under an FSDP launch
    problems += fused_lm_head_problems(recipe.model.device)  # on CUDA: what TRL's Triton kernel needs to compile
    model_dir = local_model_dir(recipe.model.path)
    problems += [p for p in [missing_folder_problem(recipe.model.path)] if p]  # a folder, not a hub id
    tokenizer = None
    if model_dir is not None:
        model_problems = model_dir_problems(model_dir, recipe.model)
        problems += model_problems
        if not model_problems:
            try:
                tokenizer = load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)
            except UserError as e:
                problems.append(str(e))
    data = data_problems(recipe) + data_kind_problems(recipe)
    problems += data
    if records and not data:  # the records of files that pass the cheap checks
        from data_tools.prepare import check_records

        problems += check_records(recipe.data, recipe.method)
    problems += init_adapter_problems(recipe)
    problems += chat_format_problems(recipe, model_dir, tokenizer)
    problems += evaluation_problems(recipe)
    return problems


def evaluation_problems(recipe: Recipe) -> list[str]:
    """The `evaluation:` section's files and tasks (finetune.evaluate.checks); nothing to check without one."""
    if recipe.evaluation is None:
        return []
    from finetune.evaluate.checks import recipe_problems

    return recipe_problems(recipe)


def method_problems(method: str) -> list[str]:
    if method in AVAILABLE_METHODS:
        return []
    return [f"method: {method!r} is not available yet in this version; use method: {' or '.join(AVAILABLE_METHODS)}"]


def output_dir_problems(output_dir: str, *, overwrite: bool) -> list[str]:
    """output_dir must be a folder we can create and write, and not hold a finished run unless --overwrite."""
    if not output_dir.strip():
        return ["output_dir: is empty; give a folder for the run's outputs, e.g. outputs/my-run"]
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        return [f"output_dir: {path} is an existing file; give a folder (new or one of earlier runs)"]
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"output_dir: {path} cannot be created: {existing} is a file, not a folder"]
    try:  # os.access is not enough: root passes it on read-only mounts, so create and remove a probe folder
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-probe-", dir=existing))
    except OSError as e:
        verb = "written" if existing == path else "created"
        return [f"output_dir: {path} cannot be {verb} ({e.strerror} in {existing}); choose a writable folder"]
    finished = [m for m in FINISHED_MARKERS if (path / m).exists()]
    if finished and not overwrite:
        return [
            f"output_dir: {path} already holds a finished run ({', '.join(finished)}); "
            "pass --overwrite to replace it, or set output_dir to a new folder (e.g. --set output_dir=...)"
        ]
    return []


def data_problems(recipe: Recipe) -> list[str]:
    """Cheap checks of every data source (data_tools.io.check_source), prefixed by the source's key."""
    from data_tools.io import check_source

    sources = [(f"data.train[{i}].path", s) for i, s in enumerate(recipe.data.train)]
    if recipe.data.eval is not None:
        sources.append(("data.eval.path", recipe.data.eval))
    return [f"{key}: {problem}" for key, source in sources for problem in check_source(source.path)]


def data_kind_problems(recipe: Recipe) -> list[str]:
    """Each source holds what the method trains on (conversations, pairs, unpaired), judged by its first record."""
    from data_tools.prepare import check_data_kind

    return check_data_kind(recipe.data, recipe.method)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def init_adapter_problems(recipe: Recipe) -> list[str]:
    """`<method>.init_adapter` is an adapter folder, or a run folder whose adapter/ is one; its config is JSON."""
    settings = method_settings(recipe)
    path = getattr(settings, "init_adapter", None)
    if path is None:
        return []
    key = f"{recipe.method}.init_adapter"
    if not path.strip():
        return [f"{key}: is empty; give an SFT run's folder (or its adapter/ folder), or leave the key out"]
    folder = Path(path).expanduser()
    if not folder.exists():
        return [f"{key}: {path!r} does not exist; give an SFT run's folder (or its adapter/ folder)"]
    if not folder.is_dir():
        return [f"{key}: {path!r} is a file; give the folder that holds adapter_config.json (or a run folder)"]
    found = init_adapter_dir(folder)
    missing = [name for name in ADAPTER_FILES if not (found / name).is_file()]
    if missing:
        return [
            f"{key}: {found} has no {' and no '.join(missing)}; give a finished run's folder or its adapter/ "
            "folder (a run writes them at the end of training)"
        ]
    config = found / "adapter_config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{key}: {config} is not readable JSON ({e})"]
    if not isinstance(data, dict) or data.get("peft_type", "LORA") != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        return [f"{key}: {config} is not a LoRA adapter config (peft_type {kind}); give a LoRA adapter folder"]
    return []


def init_adapter_dir(folder: Path) -> Path:
    """The adapter folder itself, or the adapter/ folder of a run folder."""
    inner = folder / "adapter"
    return inner if not (folder / "adapter_config.json").exists() and inner.is_dir() else folder


def chat_format_problems(recipe: Recipe, model_dir: Path | None, tokenizer: Any) -> list[str]:
    """The mistral format needs the model's tokenizer.model; the template format needs a template that parses."""
    from data_tools.chat import mistral_tokenizer_file
    from data_tools.errors import DataError

    data = recipe.data
    if data.chat_format == "mistral":
        if model_dir is None or not model_dir.is_dir():
            return []
        try:
            mistral_tokenizer_file(model_dir)
        except DataError as e:
            return [f"data.{e}"]  # the message starts with "chat_format: mistral needs ..."
        return []
    if data.chat_format != "template":
        return []
    if data.chat_template:
        return template_problems(data.chat_template)
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        return [
            "data.chat_template: chat_format is template but it is not set and the tokenizer has no chat template; "
            "give a Jinja template (text or file), or use chat_format: mistral or chatml"
        ]
    if tokenizer is not None:
        return template_problems(tokenizer.chat_template, where=f"the chat template of {model_dir}")
    return []


def template_problems(template: str, where: str | None = None) -> list[str]:
    """A template file must exist and be UTF-8; its Jinja must parse (compiled as transformers compiles it)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    text = template
    if where is None and "{" not in template:  # a file path, as data_tools.chat.resolve_template reads it
        file = Path(template).expanduser()
        if not file.is_file():
            return [f"data.chat_template: file not found: {template} (a template file, or Jinja text with {{ }})"]
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return [f"data.chat_template: {file} cannot be read as UTF-8 text ({e})"]
        where = str(file)
    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        place = f"{where}:{e.lineno}" if where else f"line {e.lineno} of the template text"
        return [f"data.chat_template: {place}: Jinja syntax error: {e.message}"]
    return []
