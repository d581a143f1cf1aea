"""The raw recipe tree, before the schema sees it: the file read as UTF-8 YAML (one mapping, no duplicate keys,
every refusal naming `FILE:LINE:COL`) and `--set key=value` overrides applied to it.

Kept apart from the schema (recipe.py) so that each reads top to bottom: bytes and YAML here, settings there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file; bad bytes, syntax errors and duplicate keys name the line (and column)."""
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    loader = yaml.SafeLoader(recipe_text(path, path.read_bytes()))
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
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML error: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys (model, lora, data, ...), got {type(data).__name__}")
    return data


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
