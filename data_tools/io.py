"""Read records with their exact location (`FILE:LINE` or `FILE:row N`, both counted from 1).

Each reader yields `RawRecord`s; a record that cannot be parsed carries `error` instead of `data`, so the validator
can report it at its line and go on with the rest of the file. Problems of the whole file (not UTF-8, compressed,
empty, a `.json` file holding several JSON values) stop with a `DataError` naming the file: reading on would drop
records silently. `check_source` runs the cheap part of these checks without parsing, for `finetune validate`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.encoding import SNIFF_BYTES, compressed_problem, decode, decode_line, text_problem
from data_tools.errors import DataError

BUILTIN_PREFIX = "builtin:"
SAMPLES = Path(__file__).parent / "samples"
BUILTINS = {
    "tiny-chat": SAMPLES / "tiny_chat.jsonl",
    "tiny-preference": SAMPLES / "tiny_preference.jsonl",
    "tiny-unpaired": SAMPLES / "tiny_unpaired.jsonl",
}
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED = ".jsonl, .json, .parquet or .csv"
JSON_CELL_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion")


@dataclass
class RawRecord:
    """One input record: `where` is `FILE:LINE` (jsonl/json/csv) or `FILE:row N` (parquet, hub), from 1."""

    where: str
    data: dict[str, Any] | None = None
    error: str | None = None


def resolve_path(path: str) -> Path | None:
    """Local path for `path` (builtin names resolved); None when it is not local (a hub id)."""
    if not path.strip():
        raise DataError(
            f"data path is empty ({path!r}); give a {ACCEPTED} file, a folder of them, a hub dataset id "
            "or builtin:tiny-chat"
        )
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
            raise DataError(f"unsupported data file type {path.suffix or '(none)'!r} ({path}); use {ACCEPTED}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        others = sorted({p.suffix or p.name for p in path.rglob("*") if p.is_file()})
        found = f" (found only: {', '.join(others[:8])})" if others else " (it is empty)"
        raise DataError(f"no {ACCEPTED} files in folder {path}{found}")
    return files


def check_source(path: str) -> list[str]:
    """Cheap checks of a data source before anything is loaded: one line per problem, [] when none is found.

    Finds an empty path string, a missing path, a folder without data files, an unsupported extension, an empty or
    whitespace-only file, and a file that is compressed or not UTF-8 in its first 64 KB (parquet: not PAR1).
    Records are not parsed, so a file that passes can still hold bad records; hub ids are not checked (offline).
    """
    try:
        local = resolve_path(path)
        files = data_files(local) if local is not None else []
    except DataError as e:
        return [e.message]
    problems = []
    for file in files:
        try:
            with file.open("rb") as f:
                head = f.read(SNIFF_BYTES + 1)
        except OSError as e:
            problems.append(f"{file}: cannot read ({e.strerror})")
            continue
        problem = _sniff(file, head[:SNIFF_BYTES], final=len(head) <= SNIFF_BYTES)
        if problem:
            problems.append(problem)
    return problems


def _sniff(file: Path, head: bytes, final: bool) -> str | None:
    if not head:
        return _empty(file)
    if SUFFIXES[file.suffix.lower()] == "parquet":
        problem = compressed_problem(file, head)
        if problem is None and not head.startswith(b"PAR1"):
            problem = f"{file}: not a parquet file (it does not start with PAR1)"
        return problem
    problem = text_problem(file, head, final=final)
    if problem is None and final and not head.decode("utf-8-sig").strip():
        problem = _empty(file)
    return problem


def _empty(file: Path, what: str = "empty file (0 records)") -> str:
    return f"{file}: {what}; remove it or fill it"


def read_records(path: str, split: str = "train") -> Iterator[RawRecord]:
    """All records of a source in order: local files, folders, built-ins, or a hub dataset (needs network)."""
    local = resolve_path(path)
    if local is None:
        yield from _read_hub(path, split)
        return
    for file in data_files(local):
        yield from read_file(file)


def read_file(file: Path) -> Iterator[RawRecord]:
    """The records of one data file; DataError when the file as a whole cannot be read (or holds none)."""
    kind = SUFFIXES[file.suffix.lower()]
    if file.stat().st_size == 0:
        raise DataError(_empty(file))
    n = 0
    for record in {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](file):
        n += 1
        yield record
    if n == 0:
        what = {
            "csv": "no records (only a header line)",
            "parquet": "no records (0 rows)",
            "json": "no records (an empty JSON array, or only whitespace)",
        }
        raise DataError(_empty(file, what.get(kind, "empty file (0 records)")))


def _read_jsonl(file: Path) -> Iterator[RawRecord]:
    with file.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = decode_line(file, number, raw)
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
    """One JSON array of objects (or one object); each record's line is where its object starts.

    Anything after the array (a second array, or JSON Lines saved as `.json`) stops with the line where it starts.
    """
    text = decode(file, file.read_bytes())
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text):
        return
    if text[i] != "[":
        data, end = _decode_at(file, decoder, text, i)
        _nothing_after(file, text, end, first="object" if isinstance(data, dict) else "value")
        yield _as_object(f"{file}:{_line(text, i)}", data)
        return
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        _nothing_after(file, text, i + 1, first="array")
        return
    while True:
        if i >= len(text):
            raise DataError(
                f"{file}:{_line(text, len(text))}: the JSON array is not closed (missing ']'); fix the file"
            )
        data, end = _decode_at(file, decoder, text, i)
        yield _as_object(f"{file}:{_line(text, i)}", data)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == "]":
            _nothing_after(file, text, i + 1, first="array")
            return
        if i < len(text) and text[i] != ",":
            raise DataError(
                f"{file}:{_line(text, i)}: invalid JSON: expected ',' or ']' after the record; fix the file"
            )
        i = _skip_ws(text, i + 1)


def _decode_at(file: Path, decoder: json.JSONDecoder, text: str, i: int) -> tuple[Any, int]:
    try:
        return decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:  # past a broken value the rest of a .json file cannot be located: stop
        raise DataError(
            f"{file}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}); the records after it cannot be read, "
            "fix the file"
        ) from None


def _nothing_after(file: Path, text: str, end: int, first: str) -> None:
    """A `.json` file holds one value; a second one used to be dropped without a word."""
    i = _skip_ws(text, end)
    if i >= len(text):
        return
    where = f"{file}:{_line(text, i)}"
    if _line(text, i) == _line(text, end - 1):
        where += f" (column {i - text.rfind(chr(10), 0, i)})"
    ended = f"after the {first} that ends on line {_line(text, end - 1)}"
    if text[i] == "{" and first == "object":
        raise DataError(
            f"{where}: a second JSON value starts here, {ended}: this looks like JSON Lines (one object per line); "
            "rename the file to .jsonl, or put the objects in one [...] array"
        )
    if text[i] == "[":
        raise DataError(f"{where}: a second JSON array starts here, {ended}; merge them into one array")
    raise DataError(f"{where}: unexpected text {ended}; a .json file holds one array (or one object)")


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_parquet(file: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    with file.open("rb") as f:
        problem = compressed_problem(file, f.read(8))
    if problem:
        raise DataError(problem)
    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for broken files
        raise DataError(f"{file}: cannot read parquet file: {e}") from None
    for row, data in enumerate(table.to_pylist(), start=1):
        yield RawRecord(f"{file}:row {row}", data=data)


def _read_csv(file: Path) -> Iterator[RawRecord]:
    """CSV with a header; cells holding JSON lists (messages, chosen...) are parsed. LINE is the physical line."""
    reader = csv.reader(io.StringIO(decode(file, file.read_bytes()), newline=""))
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
    for row, data in enumerate(ds, start=1):
        yield RawRecord(f"{dataset_id}[{split}]:row {row}", data=dict(data))


def _as_object(where: str, data: Any) -> RawRecord:
    if not isinstance(data, dict):
        return RawRecord(where, error=f"record is a JSON {type(data).__name__}, not an object")
    return RawRecord(where, data=data)
