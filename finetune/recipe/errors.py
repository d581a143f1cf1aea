"""Turning schema problems into one actionable line each, and describing the schema for `--explain`.

Kept apart from the schema itself so that recipe.py reads as the list of settings it is.
"""

from __future__ import annotations

import re
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

BUILTIN_MODELS = ("tiny-random-mixtral",)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last segment of `loc` (for did-you-mean suggestions)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        cls = unwrap_model(cls.model_fields[part].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def unwrap_model(annotation: Any) -> Any:
    """Find a BaseModel inside Optional[...] / list[...] annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = unwrap_model(arg)
        if found is not None:
            return found
    return None


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(error: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per pydantic error: dotted key, what was given, what is accepted or what to do."""
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic puts the literal/union member name into loc for unions; keep the user's path only
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))
        key = dotted(loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = model_at(root, loc)
            valid = sorted(owner.model_fields) if owner else []
            hint = closest(str(loc[-1]), valid)
            fix = f"did you mean {dotted((*loc[:-1], hint[0]))}?" if hint else f"valid keys here: {', '.join(valid)}"
            lines.append(f"{key}: unknown key; {fix}")
        elif kind == "missing":
            lines.append(f"{key}: required key is missing")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: got {short(err.get('input'))}; accepted: {expected}")
        elif kind == "value_error":
            message = err["msg"].removeprefix("Value error, ")
            # a cross-field check names its own keys (`dpo.loss_weights: ...`), one line each
            own = all(line.startswith(f"{key}.") or not loc for line in message.splitlines())
            lines += message.splitlines() if own else [f"{key}: {message}"]
        else:
            lines.append(f"{key}: got {short(err.get('input'))}; {err['msg'].lower()}")
    return dedupe(lines)


def closest(name: str, valid: list[str]) -> list[str]:
    """The most likely intended key: a close spelling, else a key that is a prefix of the name or vice versa."""
    hint = get_close_matches(name, valid, n=1)
    if hint:
        return hint
    related = [v for v in valid if name.startswith(v) or v.startswith(name)]
    return sorted(related, key=len, reverse=True)[:1]


def dedupe(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in lines if not (x in seen or seen.add(x))]


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".yaml", ".safetensors")


def looks_local(path: str) -> bool:
    """A path is local unless it looks like a hub id (`org/name`, no file suffix) and no such folder exists."""
    return Path(path).expanduser().exists() or not HUB_ID.match(path) or path.endswith(DATA_SUFFIXES)


def path_problems(data: dict[str, Any]) -> list[str]:
    """Model and data paths (in the raw recipe) that point nowhere, named by key. Hub ids are left for load time."""
    problems = []
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    model_path = model.get("path")
    if isinstance(model_path, str) and not model_path.strip():
        problems.append(
            f"model.path: is empty; give a local folder, a hub id (org/name) or the built-in {BUILTIN_MODELS[0]!r}"
        )
    elif isinstance(model_path, str) and model_path not in BUILTIN_MODELS and missing_local(model_path):
        problems.append(
            f"model.path: {model_path!r} does not exist; give a local folder, a hub id (org/name) "
            f"or the built-in {BUILTIN_MODELS[0]!r}"
        )
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    train = section.get("train") if isinstance(section.get("train"), list) else []
    sources = [(f"data.train[{i}].path", s) for i, s in enumerate(train)]
    sources.append(("data.eval.path", section.get("eval")))
    for key, source in sources:
        p = source.get("path") if isinstance(source, dict) else None
        if isinstance(p, str) and not p.strip():
            problems.append(f"{key}: is empty; give a data file or folder, a hub dataset id or builtin:tiny-chat")
        elif isinstance(p, str) and not p.startswith("builtin:") and missing_local(p):
            problems.append(f"{key}: {p!r} does not exist (paths are relative to the current folder)")
    return problems


def missing_local(path: str) -> bool:
    return looks_local(path) and not Path(path).expanduser().exists()


def explain(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field, nested models flattened."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = unwrap_model(field.annotation)
        type_text = type_name(field.annotation)
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "" if nested else short(field.default_factory(), 40)
        else:
            default = short(field.default, 40)
        rows.append((key, type_text, default, field.description or ""))
        if nested is not None:
            rows += explain(
                nested, prefix=f"{key}." if typing.get_origin(field.annotation) is not list else f"{key}[]."
            )
    return rows


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
