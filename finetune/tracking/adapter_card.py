"""What a shipped adapter says about itself: a portable base-model reference and a model card.

PEFT records the folder the model was loaded from (a cache path such as ~/.cache/finetune/… or a hub snapshot),
which means nothing on another machine. We record what the user named instead: the hub id and the exact revision,
the local path as given, or the built-in tiny model's name, which `finetune tiny-model` recreates bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.model.tiny import TINY_MODEL_NAME

HUB_SNAPSHOT_PARENT = "snapshots"


@dataclass(frozen=True)
class BaseReference:
    name_or_path: str  # what goes into adapter_config.json's base_model_name_or_path
    revision: str | None  # hub commit, when the model came from the hub
    kind: str  # "hub" | "local" | "builtin"


def base_reference(path: str, model_dir: Path, revision: str | None = None) -> BaseReference:
    """The portable name of the base: the hub id (and its resolved commit), the local path given, or the built-in."""
    if path == TINY_MODEL_NAME:
        return BaseReference(TINY_MODEL_NAME, None, "builtin")
    if Path(path).expanduser().exists():
        return BaseReference(path, None, "local")
    # a hub snapshot lives in …/snapshots/<commit>: that commit pins exactly what was trained on
    commit = model_dir.name if model_dir.parent.name == HUB_SNAPSHOT_PARENT else revision
    return BaseReference(path, commit, "hub")


def set_base_reference(model: Any, base: BaseReference) -> None:
    """Make every adapter this PEFT model saves (checkpoints and the final one) name the portable base."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base.name_or_path
        config.revision = base.revision


def _loading_snippet(base: BaseReference) -> str:
    revision = f', revision="{base.revision}"' if base.revision else ""
    return (
        "```python\n"
        "import torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base.name_or_path}"{revision}, dtype=torch.bfloat16)\n'
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")\n'
        "```\n"
    )


def _base_note(base: BaseReference) -> str:
    if base.kind == "builtin":
        return (
            f"`{TINY_MODEL_NAME}` is finetune's built-in seeded random Mixtral. Recreate it anywhere, identical, with "
            f"`finetune tiny-model -o {TINY_MODEL_NAME}`; the snippet below then loads it from that folder.\n"
        )
    if base.kind == "local":
        return f"The base was the local folder `{base.name_or_path}`; point the snippet at your copy of it.\n"
    pinned = f" at revision `{base.revision}`" if base.revision else ""
    return f"The base is the hub model `{base.name_or_path}`{pinned}.\n"


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_card(adapter_dir: Path, recipe: Any, metrics: dict[str, Any], base: BaseReference) -> Path:
    """Write adapter_dir/README.md (replacing PEFT's empty template) from the run's recipe and metrics."""
    sources = [source.path for source in recipe.data.train]
    shown = {
        "first train loss": metrics.get("first_loss"),
        "final train loss": metrics.get("final_train_loss"),
        "eval loss": metrics.get("eval_loss"),
        "aux (load-balancing) loss": metrics.get("aux_loss"),
        "optimizer steps": metrics.get("steps"),
        "tokens trained": metrics.get("tokens_trained"),
    }
    lora = recipe.lora
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base.name_or_path}",
        "tags: [mixtral, lora, finetune, " + recipe.method + "]",
        "---",
        "",
        f"# LoRA adapter for {base.name_or_path}",
        "",
        f"Trained with finetune by `{recipe.method}` on a {recipe.model.quantization} base.",
        "",
        "## Base model",
        "",
        _base_note(base),
        "## What was trained",
        "",
        f"- attention LoRA: r={lora.r}, alpha={lora.alpha}, on {', '.join(lora.attention_targets) or 'nothing'}",
        f"- expert LoRA: r={lora.expert_r or lora.r}, alpha={lora.expert_alpha or lora.alpha}, on "
        f"{', '.join(lora.expert_targets) or 'nothing'} of every expert (PEFT `target_parameters`)",
        f"- router: {lora.router}",
        f"- data: {', '.join(sources)}" + (f"; eval: {recipe.data.eval.path}" if recipe.data.eval is not None else ""),
        f"- max_length {recipe.data.max_length}, packing {recipe.data.packing}, chat format {recipe.data.chat_format}",
        "- the full recipe: `../recipe.yaml` beside this folder in the run's output",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {name} | {_metric(value)} |" for name, value in shown.items() if value is not None],
        "",
        "## Load it with stock PEFT",
        "",
        _loading_snippet(base),
    ]
    path = Path(adapter_dir) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
