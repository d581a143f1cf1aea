"""Which config.json a plan reads: the recipe's model folder, a local hub snapshot, or a shipped published config."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError


def config_dir(recipe) -> Path:
    """A folder holding the model's config.json: the built-in tiny model, a local folder, or the hub config only."""
    from finetune.model.tiny import TINY_MODEL_NAME, materialize_builtin

    path = recipe.model.path
    if path == TINY_MODEL_NAME:
        return materialize_builtin(path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.path: {local} has no config.json; the plan needs the model's config.json")
        return local
    if local.exists():
        raise UserError(f"model.path: {path!r} is a file; give the folder that holds config.json")
    from finetune.model.load import missing_folder_problem

    if problem := missing_folder_problem(path):
        raise UserError(problem)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=recipe.model.revision)  # never the network
    if isinstance(cached, str):
        return Path(cached).parent
    shipped = ""
    if SHIPPED_CONFIGS.is_dir():
        folders = ", ".join(shown_path(f) for f in sorted(SHIPPED_CONFIGS.iterdir()) if (f / "config.json").is_file())
        shipped = f"use a shipped copy (--set model.path={folders}, Mixtral-8x7B's), or "
    raise UserError(
        f"model.path: the plan needs the config.json of {path!r}, which is not in the local hub cache (the plan does "
        f"not use the network); {shipped}fetch that one file with `hf download {path} config.json --local-dir DIR` "
        "and --set model.path=DIR"
    )


SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"  # published config.json files


def shown_path(path: Path) -> str:
    """`path` relative to the working folder when it lies inside it (as a user types it), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_config(folder: Path):
    from finetune.moe.loading import _read_config

    return _read_config(folder)
