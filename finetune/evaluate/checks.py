"""Everything `finetune eval` (and `finetune validate`, for a recipe's `evaluation:` section) refuses before a model
loads, one line per problem: data files the data tools cannot read, generation files without references, task names
lm-eval does not know, task files that do not parse or whose data is missing, a missing `eval` extra, and an adapter
trained on another base than the model given. Reads headers and small files only; writes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe.evaluation import EvaluationSettings

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_attention_heads",
              "num_key_value_heads", "vocab_size")  # fmt: skip


def data_problems(path: str, key: str) -> list[str]:
    """A perplexity file: readable by the data tools as conversations, every record valid (FILE:LINE)."""
    from data_tools.errors import DataError
    from data_tools.io import check_source
    from data_tools.validate import load_source

    problems = check_source(path)
    if problems:
        return [f"{key}: {p}" for p in problems]
    try:
        loaded = load_source(path, kind="conversation")
    except DataError as e:
        return [f"{key}: {e.message}"]
    lines = [line for _, line in loaded.problems]
    more = f" (and {len(lines) - 1} more invalid records)" if len(lines) > 1 else ""
    return [f"{key}: {lines[0]}{more}"] if lines else []


def generation_problems(path: str, key: str) -> list[str]:
    """A generation file: every record has a prompt (or messages ending with the user) and a reference."""
    from finetune.evaluate.generation_tasks import read_generation_file

    try:
        _, problems = read_generation_file(path)
    except UserError as e:
        return [f"{key}: {e.message}"]
    more = f" (and {len(problems) - 1} more records like it)" if len(problems) > 1 else ""
    return [f"{key}: {problems[0]}{more}"] if problems else []


def _key(key: str, index: int) -> str:
    """A recipe list names its entry (evaluation.data[1]); a flag is named as given (--data)."""
    return f"{key}[{index}]" if key.startswith("evaluation") else key


def settings_problems(settings: EvaluationSettings, keys: dict[str, str]) -> list[str]:
    """All problems of an evaluation's inputs; `keys` names where each list came from (recipe key or flag)."""
    from finetune.evaluate.generation_tasks import require_scorers
    from finetune.evaluate.lm_eval_tasks import resolve_tasks

    problems = []
    for i, path in enumerate(settings.data):
        problems += data_problems(path, _key(keys["data"], i))
    if settings.generation:
        try:
            require_scorers()
        except UserError as e:
            problems.append(e.message)
        for i, path in enumerate(settings.generation):
            problems += generation_problems(path, _key(keys["generation"], i))
    try:
        problems += resolve_tasks(settings.tasks, keys["tasks"])[1]
    except UserError as e:  # lm-eval is not installed
        problems.append(e.message)
    return problems


RECIPE_KEYS = {"data": "evaluation.data", "generation": "evaluation.generation", "tasks": "evaluation.tasks"}
FLAG_KEYS = {"data": "--data", "generation": "--generation", "tasks": "--tasks"}


def recipe_problems(recipe: Any) -> list[str]:
    """The recipe's `evaluation:` section (for preflight, so `finetune validate` and `run` refuse it up front)."""
    settings = getattr(recipe, "evaluation", None)
    if settings is None:
        return []
    problems = settings_problems(settings, RECIPE_KEYS)
    no_split = recipe.method != "sft" or (not recipe.data.eval and recipe.data.eval_fraction == 0)
    if no_split and not (settings.data or settings.generation or settings.tasks):
        problems.append(
            "evaluation: nothing to evaluate: the run has no eval split (data.eval or data.eval_fraction, method sft) "
            "and the section names no data, generation or tasks"
        )
    return problems


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _header_shapes(file: Path) -> dict[str, list[int]]:
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def adapter_base_problem(model_dir: Path, adapter_dir: Path) -> str | None:
    """The adapter fits the model: its named base has the model's shape, and its weights the model's dimensions."""
    config = _read_json(model_dir / "config.json")
    adapter_config = _read_json(adapter_dir / "adapter_config.json")
    named = adapter_config.get("base_model_name_or_path")
    fix = "give the base it was trained on (--model), or its run folder"
    if isinstance(named, str) and named:
        from finetune.model.load import local_model_dir

        base_dir = local_model_dir(named)
        base_config = base_dir / "config.json" if base_dir is not None and base_dir.is_dir() else None
        if base_config is not None and base_config.is_file():
            theirs = _read_json(base_config)
            differ = [k for k in SHAPE_KEYS if theirs.get(k) != config.get(k)]
            if differ:
                what = ", ".join(f"{k} {theirs.get(k)} vs {config.get(k)}" for k in differ[:3])
                return f"--adapter: {adapter_dir} was trained on {named}, which is not {model_dir} ({what}); {fix}"
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        shapes = _header_shapes(weights)
    except (OSError, ValueError) as e:
        return f"--adapter: {weights} is not a readable safetensors file ({e})"
    problem = shape_problem(shapes, config, adapter_config)
    return f"--adapter: {adapter_dir} does not fit {model_dir}: {problem}; {fix}" if problem else None


def expert_projection(key: str, targets: list[str]) -> str | None:
    """Which expert projection an expert LoRA key belongs to: PEFT nests them gate_up innermost, so each
    `base_layer.` after `experts.` is one level further in."""
    from finetune.moe.quantized import PROJECTIONS

    ordered = [p for p in PROJECTIONS if p in targets]
    depth = key.partition(".experts.")[2].count("base_layer.")
    return ordered[len(ordered) - 1 - depth] if 0 <= len(ordered) - 1 - depth < len(ordered) else None


def shape_problem(shapes: dict[str, list[int]], config: dict[str, Any], adapter_config: dict[str, Any]) -> str | None:
    """The first adapter weight whose shape the model's config.json rules out (layers, dimensions, experts)."""
    import re

    hidden, ffn = config.get("hidden_size"), config.get("intermediate_size")
    layers, experts = config.get("num_hidden_layers"), config.get("num_local_experts")
    ranks = adapter_config.get("rank_pattern") or {}
    targets = [t.rpartition(".")[2] for t in adapter_config.get("target_parameters") or []]
    reads = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "gate_up_proj": hidden, "down_proj": ffn}
    writes = {"o_proj": hidden, "gate_up_proj": 2 * ffn if ffn else None, "down_proj": hidden}
    for key, shape in sorted(shapes.items()):
        layer = re.search(r"layers\.(\d+)\.", key)
        if layer and layers is not None and int(layer.group(1)) >= layers:
            return f"{key} is in layer {layer.group(1)}, the model has {layers} layers"
        if key.endswith("gate.modules_to_save.default.weight") and experts and shape[0] != experts:
            return f"{key} routes to {shape[0]} experts, the model has {experts}"
        factor = re.search(r"\.lora_([AB])\.", key)
        if factor is None:
            continue
        proj = expert_projection(key, targets) if ".experts." in key else key.split(".lora_")[0].rpartition(".")[2]
        if factor.group(1) == "A" and reads.get(proj) and shape[-1] != reads[proj]:
            return f"{key} ({proj}) reads {shape[-1]} features, the model's {proj} takes {reads[proj]}"
        if factor.group(1) == "B" and writes.get(proj) and shape[0] != writes[proj]:
            return f"{key} ({proj}) writes {shape[0]} features, the model's {proj} gives {writes[proj]}"
        if ".experts." in key and factor.group(1) == "A" and experts:
            rank = ranks.get(f"mlp.experts.{proj}", adapter_config.get("r"))
            if rank and shape[0] != rank * experts:
                return f"{key} holds LoRA for {shape[0] // rank} experts, the model has {experts}"
    return None
