"""The `finetune merge` command end to end: resolve run/adapter/base, merge into a temp folder, verify, rename.

Nothing appears under OUT until the merged checkpoint is complete and verified: the work happens in a hidden folder
beside it, renamed at the very end, so a crash, a kill or a failed check leaves OUT as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from finetune.errors import UserError
from finetune.export.merge import ONTO, Quantization, merge_shards

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
UNITS["tib"] = 2**40
COPIED = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class MergeInputs:
    adapter_dir: Path
    run_dir: Path | None
    base_name: str
    base_dir: Path
    recipe: dict
    metrics: dict


def parse_size(text: str) -> int:
    m = SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size: {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "B").lower()])


def parse_dtype(text: str | None) -> torch.dtype | None:
    if text is None or text == "auto":
        return None
    if text not in DTYPES:
        raise UserError(
            f"--dtype: {text!r} cannot be written; use one of {', '.join(DTYPES)} (or auto: keep the base's)"
        )
    return DTYPES[text]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def resolve_inputs(source: Path, base: str | None) -> MergeInputs:
    """A run folder (with adapter/) or an adapter folder; the base from --base, the adapter, or the run's recipe."""
    from finetune.model.load import resolve_model_dir

    if (source / "adapter" / "adapter_config.json").is_file():
        run_dir, adapter_dir = source, source / "adapter"
    elif (source / "adapter_config.json").is_file():
        adapter_dir = source
        run_dir = source.parent if (source.parent / "recipe.yaml").is_file() else None
    else:
        raise UserError(
            f"{source} holds no adapter (neither adapter/adapter_config.json nor adapter_config.json); "
            "give a finished run folder or an adapter folder"
        )
    recipe = {}
    if run_dir is not None:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    adapter_config = _read_json(adapter_dir / "adapter_config.json")
    name = base or adapter_config.get("base_model_name_or_path") or (recipe.get("model") or {}).get("path")
    if not name:
        raise UserError(f"{adapter_dir}: the adapter does not name its base model; pass --base PATH")
    revision = None if base else adapter_config.get("revision")
    if base:
        what = "--base"
    elif adapter_config.get("base_model_name_or_path"):
        what = f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path"
    else:
        what = f"{run_dir / 'recipe.yaml'}: model.path"
    base_dir = resolve_model_dir(name, revision=revision, what=what)
    if not (base_dir / "config.json").is_file():
        raise UserError(f"--base: {base_dir} has no config.json; is it a transformers model folder?")
    metrics = _read_json(run_dir / "metrics.json") if run_dir is not None else {}
    return MergeInputs(adapter_dir, run_dir, name, base_dir, recipe, metrics)


def run_quantization(inputs: MergeInputs) -> Quantization:
    """The run's quantisation settings (recipe) and compute dtype (metrics), which `--onto dequantized` reproduces."""
    model = inputs.recipe.get("model") or {}
    if not model:
        raise UserError(
            f"--onto dequantized needs the run's recipe.yaml to know how the base was quantised; {inputs.adapter_dir} "
            "is not inside a run folder. Merge from the run folder, or use --onto original"
        )
    dtype = inputs.metrics.get("dtype") or (model.get("dtype") if model.get("dtype") != "auto" else "float32")
    return Quantization(
        kind=model.get("quantization", "nf4"),
        double_quant=bool(model.get("double_quant", True)),
        dtype=DTYPES.get(dtype, torch.float32),
    )


def check_out(out: Path, base_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    resolved = out.resolve()
    if resolved in (base_dir.resolve(), adapter_dir.resolve()) or base_dir.resolve().is_relative_to(resolved):
        raise UserError(f"-o {out}: that is the base or adapter folder itself; write the merge to a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"-o {out}: already exists; pass --overwrite to replace it, or choose another folder")


def write_card(out: Path, inputs: MergeInputs, onto: str, verification: str | None) -> None:
    recipe, metrics = inputs.recipe, inputs.metrics
    sources = [s.get("path") for s in ((recipe.get("data") or {}).get("train") or []) if isinstance(s, dict)]
    lines = [
        "---",
        f"base_model: {inputs.base_name}",
        "tags: [mixtral, merged-lora, finetune]",
        "---",
        "",
        f"# {inputs.base_name} + LoRA, merged",
        "",
        f"A standard Mixtral checkpoint: the base `{inputs.base_name}` with a finetune LoRA adapter merged in "
        f"({'onto the original 16-bit weights' if onto == 'original' else 'onto dequant(quant(W)), the function trained under QLoRA'}).",
        "",
        f"- method: {recipe.get('method', 'unknown')}",
        f"- data: {', '.join(map(str, sources)) or 'unknown'}",
        f"- recipe: {'recipe.yaml of run ' + str(inputs.run_dir) if inputs.run_dir else 'not recorded'}",
    ]
    for key in ("final_train_loss", "eval_loss", "steps"):
        if metrics.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {metrics[key]}")
    if verification:
        lines.append(f"- {verification}")
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", dtype="auto")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _copy_side_files(tmp: Path, inputs: MergeInputs, dtype: torch.dtype | None) -> None:
    config = json.loads((inputs.base_dir / "config.json").read_text())
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in COPIED:  # the tokenizer saved with the adapter wins: it is the one training used
        for folder in (inputs.adapter_dir, inputs.base_dir):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
                break


def merge(source: Path, out: Path, *, base=None, onto="original", dtype=None, max_shard_size="5GB", verify=True,
          overwrite=False, echo=print) -> dict:  # fmt: skip
    """Merge, verify and publish; returns the summary. Raises UserError (nothing written) on bad input."""
    if onto not in ONTO:
        raise UserError(f"--onto: {onto!r}; use one of {', '.join(ONTO)}")
    out_dtype, max_bytes = parse_dtype(dtype), parse_size(max_shard_size)
    inputs = resolve_inputs(Path(source), base)
    check_out(out, inputs.base_dir, inputs.adapter_dir, overwrite)
    quantization = run_quantization(inputs) if onto == "dequantized" else Quantization()
    echo(f"merge: {inputs.adapter_dir} onto {onto} {inputs.base_name} ({inputs.base_dir})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = merge_shards(
            inputs.base_dir, inputs.adapter_dir, tmp, onto=onto, dtype=out_dtype, quantization=quantization,
            max_shard_bytes=max_bytes,
        )  # fmt: skip
        _copy_side_files(tmp, inputs, out_dtype)
        echo(f"merge: wrote {len(summary['shards'])} shard(s), {summary['bytes'] / 1e9:.2f} GB")
        verdict = None
        if verify:
            from finetune.export.verify import verify_merge

            check = verify_merge(tmp, inputs.base_dir, inputs.adapter_dir, onto=onto, quantization=quantization,
                                 dtype=out_dtype or torch.float32)  # fmt: skip
            verdict = check.describe()
            echo(verdict)
            summary["verification"] = {"relative_diff": check.relative_diff, "tolerance": check.tolerance,
                                       "layers": check.layers, "total_layers": check.total_layers}  # fmt: skip
            if not check.passed:
                raise MergeVerificationError(verdict + f"; nothing was written to {out}")
        write_card(tmp, inputs, onto, verdict)
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        if out.exists():  # --overwrite: swap the old folder out first, delete it only once the new one is in place
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    echo(f"merged model: {out}")
    return summary


class MergeVerificationError(RuntimeError):
    """The merged logits do not match the unmerged model's: exit 1 (not the user's input), OUT untouched."""
