"""The raw recipe tree, before the schema sees it: the file read as UTF-8 YAML (one mapping, no duplicate keys,
every refusal naming `FILE:LINE:COL`) and `--set key=value` overrides applied to it.

Kept apart from the schema (recipe.py) so that each reads top to bottom: bytes and YAML here, settings there.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file; bad bytes, syntax errors and duplicate keys name the line (and column)."""
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    text = recipe_text(path, path.read_bytes())
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = duplicate_keys(node) if node is not None else []
        if duplicates:
            raise UserError(
                f"{path}: duplicate keys (YAML would silently keep the last one); keep one of each",
                [f"{path}:{line}: duplicate key {key!r} (first at line {first})" for key, line, first in duplicates],
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise UserError(syntax_message(path, text, e)) from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML error: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys (model, lora, data, ...), got {type(data).__name__}")
    return data


def syntax_message(path: Path, text: str, error: yaml.MarkedYAMLError) -> str:
    """A YAML syntax error in the user's words, at `FILE:LINE`: what is wrong with that line and how to fix it.

    PyYAML speaks of its parser (`expected <block end>, but found '<block mapping start>'`); the usual causes are a
    key indented out of line with its neighbours, a tab, a `: ` inside a value or an unclosed quote."""
    mark, problem, context = error.problem_mark, error.problem or "", error.context or ""
    if mark is None:
        return f"{path}: YAML syntax error: {problem}"
    lines = text.splitlines()
    row = lines[mark.line] if mark.line < len(lines) else ""
    above = previous_content_line(lines, mark.line)
    where, key = f"{path}:{mark.line + 1}", row.strip().split(":")[0]
    line_up = "keys of one section must line up, each indented by the same number of spaces"
    if problem.startswith("found character") and "\\t" in problem:  # PyYAML writes the tab as \t
        return f"{where}: a tab character in the indentation; YAML indents with spaces only, replace it with spaces"
    if problem.startswith("expected <block end>") and above is not None:
        _, above_key, above_at = above
        return (
            f"{where}: bad indentation: `{key}` is indented {indent(row)} spaces but `{above_key}` on line "
            f"{above_at + 1} is indented {key_column(lines[above_at])}; {line_up}"
        )
    if problem == "mapping values are not allowed here":
        if above is not None and indent(row) > key_column(lines[above[2]]) and above[1] and ": " in lines[above[2]]:
            _, above_key, above_at = above
            return (
                f"{where}: bad indentation: `{key}` is indented {indent(row)} spaces, more than `{above_key}` on line "
                f"{above_at + 1} ({key_column(lines[above_at])}), so YAML reads it as the rest of that value; {line_up}"
            )
        return (
            f"{where}:{mark.column + 1}: a value holds ': ', which YAML reads as a second key; put the value in "
            'quotes, e.g. key: "a: b"'
        )
    if context.startswith("while scanning a quoted scalar") and error.context_mark is not None:
        opened = error.context_mark
        return f"{path}:{opened.line + 1}:{opened.column + 1}: a quoted value is never closed; add the closing quote"
    return f"{where}:{mark.column + 1}: YAML syntax error: {problem}"


def indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def key_column(line: str) -> int:
    """Where the line's key starts: after the indentation and any `- ` list markers."""
    stripped = line.lstrip(" ")
    column = len(line) - len(stripped)
    while stripped.startswith("- "):
        rest = stripped[2:].lstrip(" ")
        column += len(stripped) - len(rest)
        stripped = rest
    return column


def previous_content_line(lines: list[str], before: int) -> tuple[str, str, int] | None:
    """(text, key, index) of the nearest line above `before` that is neither blank nor a comment."""
    for i in range(min(before, len(lines)) - 1, -1, -1):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#"):
            return lines[i], stripped.lstrip("- ").split(":")[0], i
    return None


def duplicate_keys(node: yaml.Node, prefix: str = "", seen: set[int] | None = None) -> list[tuple[str, int, int]]:
    """(dotted key, line, line of the first occurrence) for every key repeated within one mapping."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already walked
        return []
    seen.add(id(node))
    found: list[tuple[str, int, int]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are meant to be overridden
                continue
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in first:
                found.append((key, line, first[key]))
            first.setdefault(key, line)
            found += duplicate_keys(value_node, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += duplicate_keys(item, f"{prefix}[{i}]", seen)
    return found


NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE  # what YAML refuses: control characters other than tab/newline
CONTROL_NAMES = {"\x1b": "ESC, the start of a terminal colour code such as \\x1b[31m"}


def recipe_text(path: Path, raw: bytes) -> str:
    """The recipe as text, or a `FILE:LINE:COL` error saying what is there when it is not UTF-8 YAML text."""
    if looks_utf16(raw):
        raise UserError(f"{path}: the file is UTF-16 text; save it as UTF-8 (a recipe is UTF-8 YAML)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = line_column(raw, e.start)
        kind = "binary data, not text" if b"\x00" in raw else "text in another encoding (Latin-1? Windows-1252?)"
        raise UserError(
            f"{path}:{line}:{column}: byte 0x{raw[e.start]:02x} is not UTF-8: {kind}; a recipe is UTF-8 YAML text"
        ) from None
    bad = [(m.start(), m.group()) for m in NON_PRINTABLE.finditer(text)]
    if bad:
        problems = []
        for offset, char in bad[:10]:
            line, column = line_column(text, offset)
            code = repr(char)[1:-1]
            what = CONTROL_NAMES.get(char, "a control character")
            problems.append(f"{path}:{line}:{column}: {code} ({what}); delete it")
        raise UserError(
            f"{path}: {len(bad)} control character(s), which YAML does not allow (pasted from a terminal?)", problems
        )
    return text


def looks_utf16(raw: bytes) -> bool:
    """A UTF-16 byte-order mark, or ASCII text with a NUL byte beside every character."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    head = raw[:200]
    even, odd = head[0::2], head[1::2]
    return len(head) >= 4 and (even.count(0) == len(even)) != (odd.count(0) == len(odd))


def line_column(text: str | bytes, offset: int) -> tuple[int, int]:
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1
    return line, offset - (text.rfind(newline, 0, offset) + 1) + 1


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Apply `a.b.c=value` overrides in place (value parsed as YAML, so typed later by the schema).

    A numeric segment indexes a list (`data.train.0.path=x`). Returns problems instead of raising.
    """
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=10")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                problems.append(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
                break
        else:
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
    return problems


def override_key(item: str) -> str:
    """The key of a `--set` item as problems name it: `data.train.0.path=x` -> `data.train[0].path`."""
    key = item.partition("=")[0]
    out = ""
    for part in key.split("."):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def blame_overrides(path: Path, problems: list[str], overrides: list[str] | tuple[str, ...]) -> UserError:
    """The recipe's problems, each caused by a `--set` value naming that flag as its source (not the file)."""
    keys = [(override_key(item), item) for item in overrides]
    lines, from_flags = [], 0
    for problem in problems:
        source = None
        if not problem.startswith("--set "):
            # the last --set of a key wins, as in apply_overrides
            source = next(
                (item for key, item in reversed(keys) if problem.startswith((f"{key}:", f"{key}.", f"{key}["))), None
            )
        if problem.startswith("--set ") or source:
            from_flags += 1
        lines.append(f"{problem} (from --set {source})" if source else problem)
    if from_flags == len(lines):
        heading = f"--set: {len(lines)} problem(s), all in values given with --set (not in {path})"
    elif from_flags:
        heading = f"{path} and --set: {len(lines)} problem(s), {from_flags} of them from --set"
    else:
        heading = f"{path}: {len(lines)} problem(s) in the recipe"
    return UserError(heading, lines)


def steps_per_epoch(rows: int, batch_size: int, accumulation: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over `rows`, as transformers' Trainer counts them (a short last step counts)."""
    batches = math.ceil(math.ceil(rows / max(world_size, 1)) / batch_size)
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def run_length_notes(text: str, training: Any, rows: int | None = None, world_size: int = 1, unit: str = "rows") -> str:
    """The resolved recipe's YAML with a comment on what sets the run's length, beside max_steps and num_epochs.

    With max_steps set, num_epochs does not apply (transformers ignores it); without, num_epochs does. Given the
    number of training rows, the comment says how many passes (or steps) that makes. Comments keep the dump a
    valid recipe and leave the resume check (which compares parsed YAML) unchanged."""
    per_epoch = (
        steps_per_epoch(rows, training.batch_size, training.gradient_accumulation_steps, world_size) if rows else None
    )
    over = f" over {rows:,} {unit}" if rows else ""
    if training.max_steps != -1:
        epochs = f" (≈ {training.max_steps / per_epoch:.1f} epochs{over})" if per_epoch else ""
        notes = {"max_steps": f"sets the run's length{epochs}", "num_epochs": "not used: max_steps is set"}
    else:
        steps = f" ({math.ceil(training.num_epochs * per_epoch):,} steps{over})" if per_epoch else ""
        notes = {"max_steps": "-1: num_epochs sets the run's length", "num_epochs": f"sets the run's length{steps}"}
    lines, section = text.splitlines(), None
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "-")):
            section = line.split(":")[0]
        key = line.strip().split(":")[0]
        if section == "training" and line.startswith("  ") and not line.startswith("   ") and key in notes:
            lines[i] = f"{line}  # {notes.pop(key)}"
    return "\n".join(lines) + "\n"
