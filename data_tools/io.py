"""Read records with their exact location (`FILE:LINE` or `FILE:row N`) and write outputs without clobbering.

Each reader yields `RawRecord`s; a record that cannot even be parsed carries `error` instead of `data`, so the
validator can report it at its line and go on with the rest of the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTINS = {"tiny-chat": Path(__file__).parent / "samples" / "tiny_chat.jsonl"}
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
JSON_CELL_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion")


@dataclass
class RawRecord:
    """One input record: `where` is `FILE:LINE` (jsonl/json/csv) or `FILE:row N` (parquet, hub)."""

    where: str
    data: dict[str, Any] | None = None
    error: str | None = None


def resolve_path(path: str) -> Path | None:
    """Local path for `path` (builtin names resolved); None when it is not local (a hub id)."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise DataError(
                f"unknown built-in dataset {path!r}; available: {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
            )
        return BUILTINS[name]
    p = Path(path).expanduser()
    if p.exists():
        return p
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and Path(path).suffix == ""
    if looks_like_hub_id:
        return None
    raise DataError(f"data file not found: {path}")


def data_files(path: Path) -> list[Path]:
    """The data files of a file or folder (sorted, so every run reads the same order)."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"unsupported data file type {path.suffix!r} ({path}); use .jsonl, .json, .parquet or .csv")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"no .jsonl/.json/.parquet/.csv files in folder {path}")
    return files


def read_records(path: str, split: str = "train") -> Iterator[RawRecord]:
    """All records of a source in order: local files, folders, built-ins, or a hub dataset (needs network)."""
    local = resolve_path(path)
    if local is None:
        yield from _read_hub(path, split)
        return
    for file in data_files(local):
        kind = SUFFIXES[file.suffix.lower()]
        yield from {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](file)


def _read_jsonl(file: Path) -> Iterator[RawRecord]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                data = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield RawRecord(where, error=f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            yield _as_object(where, data)


def _read_json(file: Path) -> Iterator[RawRecord]:
    """A JSON array of objects (or one object); each record's line is where its object starts."""
    text = file.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] != "[":
        try:
            data, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield RawRecord(f"{file}:{e.lineno}", error=f"invalid JSON: {e.msg} (column {e.colno})")
            return
        yield _as_object(f"{file}:{text.count(chr(10), 0, i) + 1}", data)
        return
    i, line, counted = i + 1, 1, 0
    while True:
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        if i >= len(text) or text[i] == "]":
            return
        line += text.count("\n", counted, i)
        counted = i
        try:
            data, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield RawRecord(f"{file}:{e.lineno}", error=f"invalid JSON: {e.msg} (column {e.colno})")
            return  # the rest of the array cannot be located reliably
        yield _as_object(f"{file}:{line}", data)
        i = end


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_parquet(file: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for broken files
        raise DataError(f"cannot read parquet file {file}: {e}") from e
    for row, data in enumerate(table.to_pylist()):
        yield RawRecord(f"{file}:row {row}", data=data)


def _read_csv(file: Path) -> Iterator[RawRecord]:
    """CSV with a header; cells holding JSON lists (messages, chosen...) are parsed. LINE is the physical line."""
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for cells in reader:
            where = f"{file}:{start}"
            start = reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                yield RawRecord(where, error=f"{len(cells)} cells but the header has {len(header)} columns")
                continue
            yield _parse_json_cells(where, dict(zip(header, cells, strict=True)))


def _parse_json_cells(where: str, data: dict[str, Any]) -> RawRecord:
    for key in JSON_CELL_COLUMNS:
        value = data.get(key)
        if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
            try:
                data[key] = json.loads(value)
            except json.JSONDecodeError as e:
                return RawRecord(where, error=f"invalid JSON in column {key!r}: {e.msg}")
    return RawRecord(where, data=data)


def _read_hub(dataset_id: str, split: str) -> Iterator[RawRecord]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all user errors here
        raise DataError(f"cannot load hub dataset {dataset_id!r} (split {split!r}): {e}") from e
    for row, data in enumerate(ds):
        yield RawRecord(f"{dataset_id}[{split}]:row {row}", data=dict(data))


def _as_object(where: str, data: Any) -> RawRecord:
    if not isinstance(data, dict):
        return RawRecord(where, error=f"record is a JSON {type(data).__name__}, not an object")
    return RawRecord(where, data=data)


def check_output(path: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    """Refuse to overwrite an existing output (unless asked) and never write over an input."""
    resolved = path.resolve()
    if any(resolved == Path(i).resolve() for i in inputs):
        raise DataError(f"output {path} is one of the inputs; choose another output path")
    if path.exists() and not overwrite:
        raise DataError(f"output {path} already exists; pass --overwrite to replace it")


def write_jsonl(path: Path, rows, overwrite: bool = False, inputs: list[Path] = ()) -> int:
    """Write rows as JSON lines atomically (temp file + rename), so a failure never leaves half a file."""
    check_output(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
