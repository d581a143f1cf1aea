"""Standard benchmarks through lm-evaluation-harness, on the in-memory model: base and adapter from one load.

lm-eval's `HFLM` wraps our loaded model and tokenizer object (never a hub lookup by name) and `simple_evaluate`
runs each task once per column, the base column inside the adapter's `disable_adapter()`. A task is an lm-eval name
or a task YAML file/folder; local tasks read their records offline (`dataset_path: json`, `dataset_kwargs:
{data_files: ...}`). A relative `data_files` path is read from the task file's folder (lm-eval itself reads it from
the working directory), so the shipped task runs from anywhere. The tasks shipped in data_tools/samples/ are known
by name too, without indexing lm-eval's thousands of built-in tasks.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.io import SAMPLES
from finetune.errors import UserError

EVAL_EXTRA = "pip install 'finetune[eval]'"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
# Said once per HFLM built from an in-memory model: that is how this module uses it on purpose, so they are noise.
HFLM_NOTICES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@dataclass(frozen=True)
class TaskSpec:
    given: str  # what the user wrote
    spec: str  # what lm-eval loads: a registered name or an absolute YAML path
    folder: Path | None  # the task file's folder (relative data_files are read from here)
    builtin: bool  # needs lm-eval's own index of built-in tasks


def require_lm_eval(key: str = "--tasks") -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"{key} needs lm-evaluation-harness (lm-eval), which is not installed; {EVAL_EXTRA}") from None


def read_task_yaml(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(config, problem): the task file read as lm-eval reads it (includes merged, `!function` tags kept as text)."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=False)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        return None, f"{where}: the task file is not valid YAML ({problem}); fix it"
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"{path}: cannot read the task file ({e})"
    if not any(key in cfg for key in ("task", "group", "class")):
        return None, f"{path}: not an lm-eval task file (no 'task' or 'group' key)"
    return cfg, None


def data_file_problems(cfg: dict[str, Any], folder: Path, where: Path) -> list[str]:
    """A local task's data files must exist and parse (JSON / JSON Lines records), read as lm-eval will."""
    if cfg.get("dataset_path") not in LOCAL_BUILDERS:
        return []  # a hub dataset: lm-eval fetches it, and it cannot be checked offline
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        return [f"{where}: dataset_path {cfg['dataset_path']} needs dataset_kwargs.data_files (the local records)"]
    names = list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files]
    problems = []
    for name in (n for group in names for n in (group if isinstance(group, list) else [group])):
        path = Path(str(name)).expanduser()
        path = path if path.is_absolute() else folder / path
        if "*" in path.name:
            if not list(path.parent.glob(path.name)):
                problems.append(f"{where}: data_files {name}: no file matches {path}")
            continue
        if not path.is_file():
            problems.append(f"{where}: data_files {name}: {path} does not exist")
        elif cfg["dataset_path"] == "json":
            problems += json_problems(path)
    return problems


def json_problems(path: Path) -> list[str]:
    """JSON Lines: every non-blank line a JSON object; a .json file: one JSON value. First bad line only."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"{path}: cannot read it as UTF-8 text ({e})"]
    if path.suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            json.loads(text)
            return []
        except json.JSONDecodeError as e:
            return [f"{path}:{e.lineno}: not valid JSON ({e.msg})"]
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return [f"{path}:{number}: not a JSON line ({e.msg})"]
    return []


def _yaml_tasks(path: Path, given: str) -> tuple[list[TaskSpec], list[str]]:
    cfg, problem = read_task_yaml(path)
    if problem:
        return [], [problem]
    problems = data_file_problems(cfg, path.parent, path) if "task" in cfg and "group" not in cfg else []
    return [TaskSpec(given, str(path.resolve()), path.parent.resolve(), False)], problems


def shipped_tasks() -> dict[str, Path]:
    """Task name → YAML file of the tasks shipped in data_tools/samples/."""
    found = {}
    for path in sorted(SAMPLES.glob("*.yaml")):
        cfg, _ = read_task_yaml(path)
        if cfg is not None and isinstance(cfg.get("task"), str):
            found[cfg["task"]] = path
    return found


_BUILTIN_NAMES: list[str] | None = None


def builtin_task_names() -> list[str]:
    """Every name lm-eval's own index knows (tasks, groups, tags); indexing reads thousands of files, so once."""
    global _BUILTIN_NAMES
    if _BUILTIN_NAMES is None:
        from lm_eval.tasks import TaskManager

        _BUILTIN_NAMES = TaskManager().all_tasks
    return _BUILTIN_NAMES


def resolve_tasks(entries: list[str], key: str = "--tasks") -> tuple[list[TaskSpec], list[str]]:
    """Task names and task files/folders → TaskSpecs, and one line per problem (unknown name, bad file, data)."""
    if not entries:
        return [], []
    require_lm_eval(key)
    specs, problems, names = [], [], []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.yaml") if "__pycache__" not in p.parts)
            if not files:
                problems.append(f"{key}: {entry} is a folder without task YAML files")
            for file in files:
                found, bad = _yaml_tasks(file, entry)
                specs += found
                problems += bad
        elif path.is_file():
            found, bad = _yaml_tasks(path, entry)
            specs += found
            problems += bad
        elif path.suffix in (".yaml", ".yml") or os.sep in entry:
            problems.append(f"{key}: {entry} does not exist; give an lm-eval task name or a task YAML file/folder")
        else:
            names.append(entry)
    shipped = shipped_tasks() if names else {}
    unknown = [n for n in names if n not in shipped]
    known = builtin_task_names() if unknown else []
    for name in names:
        if name in shipped:
            found, bad = _yaml_tasks(shipped[name], name)
            specs += found
            problems += bad
        elif name in known:
            specs.append(TaskSpec(name, name, None, True))
        else:
            hint = difflib.get_close_matches(name, [*known, *shipped], n=3)
            guess = f" (did you mean {', '.join(hint)}?)" if hint else ""
            problems.append(f"{key}: lm-eval knows no task {name!r}{guess}; give a task name or a task YAML file")
    return specs, problems


@contextlib.contextmanager
def working_dir(folder: Path | None):
    """Run inside the task file's folder, so lm-eval reads its relative data_files from there."""
    before = Path.cwd()
    if folder is not None:
        os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys as the task's own names ('acc', 'acc_stderr')."""
    metrics = {}
    for key, value in result.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
    return metrics


def quiet_hflm() -> None:
    from finetune.quiet import DropMessages

    logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, DropMessages) and f.prefixes == HFLM_NOTICES for f in logger.filters):
        logger.addFilter(DropMessages(HFLM_NOTICES))


def make_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM on the in-memory model and tokenizer object; piped (not a terminal), without its progress
    bars, which it draws with no switch of their own (the `disable_tqdm` its request methods take)."""
    import sys

    from lm_eval.models.huggingface import HFLM

    quiet_hflm()
    quiet = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(
    model: Any, tokenizer: Any, specs: list[TaskSpec], columns: dict[str, Any], *, batch_size: int,
    limit: int | None, bootstrap_iters: int,
) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """{task: {column: {metric: value}}}; `columns` maps a column name to a context manager factory (the base's
    is the adapter's disable_adapter)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = make_lm(model, tokenizer, batch_size)
    managers: dict[tuple[Path | None, bool], Any] = {}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in specs:
        index_key = (spec.folder, spec.builtin)
        if index_key not in managers:
            managers[index_key] = TaskManager(include_path=spec.folder, include_defaults=spec.builtin)
        for column, context in columns.items():
            with context(), working_dir(spec.folder):
                out = simple_evaluate(
                    model=lm, tasks=[spec.spec], task_manager=managers[index_key], limit=limit,
                    log_samples=False, bootstrap_iters=bootstrap_iters,
                )  # fmt: skip
            for task, result in out["results"].items():
                results.setdefault(task, {})[column] = metrics_of(result)
    return results
