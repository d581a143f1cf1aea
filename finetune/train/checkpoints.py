"""Checkpoints on disk: atomic publication, selection, rotation, and the resume check made before loading.

HF Trainer writes a checkpoint file by file, so a kill mid-save leaves a folder that looks like a checkpoint but
is not one (GUIDE: atomic saving was added to transformers and reverted twice). Here the Trainer writes into
`checkpoints/.partial/checkpoint-N`; once every rank has finished, rank 0 adds the resolved recipe, fsyncs, renames
the folder to `checkpoints/checkpoint-N` and writes the `COMPLETE` marker last. Only folders with a marker naming
their own step are checkpoints; everything else is skipped with a warning and cleaned away. Rotation
(`training.save_total_limit`) is ours too, among complete checkpoints only. The finished run's adapter/ and
metrics.json are published the same way (`publish_run`).

Pure file logic, no torch: `preflight` imports it, and the tests drive it on plain folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHECKPOINTS = "checkpoints"
STAGING = ".partial"
MARKER = "COMPLETE"
RECIPE = "recipe.yaml"
TRAINING_ARGS = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME
NAME = re.compile(r"checkpoint-(\d+)")

# Recipe keys a resume may change: they do not change the trained result (a longer run is the user's intent).
RESUMABLE_KEYS = (
    "training.max_steps",
    "training.num_epochs",
    "training.logging_steps",
    "training.eval_steps",
    "training.save_steps",
    "training.save_minutes",
    "training.save_total_limit",
    "tracking",
    "evaluation",  # what is measured after training, not what training computes
    "output_dir",
)


@dataclass
class Scan:
    """What `checkpoints/` holds: complete checkpoints by step (oldest first), and what resume must not use."""

    complete: list[tuple[int, Path]] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)
    staging: Path | None = None

    @property
    def latest(self) -> tuple[int, Path] | None:
        return self.complete[-1] if self.complete else None


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser() / CHECKPOINTS


def staging_dir(output_dir: str | Path) -> Path:
    """The Trainer's own output_dir: it writes `checkpoint-N` here, and `publish` moves it out when complete."""
    return checkpoints_dir(output_dir) / STAGING


def marker_step(folder: Path) -> int | None:
    """The step the COMPLETE marker records, or None when it is missing or unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return int(data["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def world_size_problem(folder: Path, world_size: int) -> str | None:
    """A resume must run as many processes as wrote the checkpoint: the global batch and each rank's data shard and
    RNG state depend on it."""
    try:
        saved = int(json.loads((folder / MARKER).read_text(encoding="utf-8")).get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if saved == world_size:
        return None
    return (
        f"output_dir: {folder} was written by {saved} process(es) and this run has {world_size}; launch "
        f"{saved} to resume it, or pass --no-resume to start over (the checkpoints are deleted)"
    )


def scan(output_dir: str | Path) -> Scan:
    """Sort `checkpoints/` into complete and incomplete checkpoints; other names (no step number) are left alone."""
    root = checkpoints_dir(output_dir)
    found = Scan()
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        if entry.name == STAGING:
            found.staging = entry
            continue
        match = NAME.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        step = int(match.group(1))
        if marker_step(entry) == step:
            found.complete.append((step, entry))
        else:
            found.incomplete.append(entry)
    found.complete.sort()
    found.incomplete.sort()
    return found


def clean_leftovers(found: Scan) -> list[str]:
    """Remove staging leftovers and incomplete checkpoints (a kill mid-save); one warning line per removal."""
    warnings = []
    for folder in found.incomplete:
        warnings.append(f"warning: skipping incomplete checkpoint {folder} (no {MARKER} marker: killed while saving)")
        shutil.rmtree(folder, ignore_errors=True)
    if found.staging is not None and found.staging.exists():
        if any(found.staging.iterdir()):
            warnings.append(f"warning: removing unfinished checkpoint writes in {found.staging}")
        shutil.rmtree(found.staging, ignore_errors=True)
    return warnings


def clear_checkpoints(output_dir: str | Path) -> None:
    """--no-resume: the old run's checkpoints go before the new run writes any, so rotation never mixes runs."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        shutil.rmtree(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, step: int, recipe_text: str, world_size: int = 1) -> Path:
    """Make a fully written staged checkpoint visible: recipe in, fsync, rename, then the COMPLETE marker last."""
    root = staged.parent.parent
    (staged / RECIPE).write_text(recipe_text, encoding="utf-8")
    # the Trainer's pickled TrainingArguments carries secrets given through training.extra (hub_token, ...) in clear;
    # resume never reads it, and the scrubbed recipe beside it is the run's whole configuration
    (staged / TRAINING_ARGS).unlink(missing_ok=True)
    for path in staged.rglob("*"):
        if path.is_file():
            _fsync(path)
    final = root / f"checkpoint-{step}"
    if final.exists():  # an incomplete one of the same step, from a killed run
        shutil.rmtree(final)
    os.replace(staged, final)
    (staged.parent / "README.md").unlink(missing_ok=True)  # TRL's model card, rewritten into output_dir on each save
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the staging folder, when nothing else is being written there
    marker = {"step": step, "world_size": world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = final / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, final / MARKER)
    _fsync(final)
    _fsync(root)
    return final


ADAPTER_STAGING = ".adapter.partial"


def adapter_staging(output_dir: str | Path, *, clear: bool) -> Path:
    """Where a finished run writes its adapter before `publish_run` renames it to adapter/; `clear` (rank 0 only)
    removes what a run killed while writing it left there."""
    staged = Path(output_dir).expanduser() / ADAPTER_STAGING
    if clear:
        shutil.rmtree(staged, ignore_errors=True)
    return staged


def publish_run(staged_adapter: Path, output_dir: str | Path, metrics_text: str) -> None:
    """Make a finished run visible: everything fsynced, then adapter/ by one rename and metrics.json by another.

    A kill before the first rename leaves no finished-run marker, so the same command resumes from the newest
    checkpoint; a SIGTERM between the renames waits for both (`interrupt.StopOnSignal.deferring_exit`)."""
    output_dir = Path(output_dir).expanduser()
    metrics_tmp = output_dir / ".metrics.json.tmp"
    metrics_tmp.write_text(metrics_text, encoding="utf-8")
    for path in [*staged_adapter.rglob("*"), metrics_tmp]:
        if path.is_file():
            _fsync(path)
    _fsync(staged_adapter)
    final = output_dir / "adapter"
    if final.exists():  # not expected: a finished run is refused, or cleared by --overwrite, before loading
        shutil.rmtree(final)
    os.replace(staged_adapter, final)
    os.replace(metrics_tmp, output_dir / "metrics.json")
    _fsync(output_dir)


def rotate(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints; the marker goes first, so a kill mid-delete leaves no candidate."""
    if not limit:
        return []
    removed = []
    for _, folder in scan(output_dir).complete[:-limit]:
        (folder / MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def trim_log(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after `step` (by the run that was killed), so the resumed log reads once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue  # a line cut short by the kill
        if isinstance(row_step, (int, float)) and row_step <= step:
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def first_logged_loss(path: Path) -> float | None:
    """The run's first train loss, from metrics.jsonl, for metrics.json of a resumed run."""
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row:
            return row["loss"]
    return None


# --- the resume check --------------------------------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {dotted.key: leaf}; lists index by position (data.train.0.path)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return {prefix: data}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not flat and prefix:
        flat[prefix] = data  # an empty dict or list is a value too
    return flat


def resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose change alters what training computes, as `key: checkpoint X, recipe Y` lines."""
    old, new = flatten(saved), flatten(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if resumable(key) or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        lines.append(f"{key}: checkpoint {old.get(key, '<unset>')!r}, recipe {new.get(key, '<unset>')!r}")
    return lines


def resolved_recipe(recipe) -> str:
    """The text checkpoints store and the check compares: the resolved recipe with secrets scrubbed."""
    from finetune.recipe.schema import dump_recipe
    from finetune.recipe.secrets import scrub_yaml

    return scrub_yaml(dump_recipe(recipe))


def resume_problems(recipe, *, resume: bool = True) -> list[str]:
    """Refusals for resuming into recipe.output_dir: the latest complete checkpoint's recipe must match this one.

    Nothing to check without a complete checkpoint, with resume off, or over a finished run (output_dir's own
    check refuses that, or --overwrite replaces it)."""
    output_dir = Path(recipe.output_dir).expanduser()
    if not resume or any((output_dir / m).exists() for m in ("metrics.json", "adapter")):
        return []
    latest = scan(output_dir).latest
    if latest is None:
        return []
    step, folder = latest
    how = "pass --no-resume to start over (the checkpoints are deleted), or set output_dir to a new folder"
    try:
        saved = yaml.safe_load((folder / RECIPE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"output_dir: cannot read the recipe of {folder} to check the resume ({e}); {how}"]
    current = yaml.safe_load(resolved_recipe(recipe))
    problems = []
    differences = recipe_differences(saved if isinstance(saved, dict) else {}, current)
    if differences:
        problems.append(
            f"output_dir: {folder} (step {step}) was trained with a different recipe, so resuming would not give "
            f"the run either recipe describes; {how}. Differing keys: " + "; ".join(differences)
        )
    max_steps = recipe.training.max_steps
    if max_steps != -1 and max_steps < step:
        problems.append(
            f"training.max_steps: {max_steps} is below step {step} of {folder}; raise it to resume, or {how}"
        )
    return problems
