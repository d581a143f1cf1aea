"""Write records in the format the output's extension names, atomically, never over an input.

`.json` gets one array (one record per line), `.jsonl` JSON Lines, `.parquet` a table, `.csv` a header and rows.
Writing JSON Lines into a `.json` file once made every reader see one record; now each extension gets its own
format, and the readers in `data_tools.io` read each of them back to the same records.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_tools.errors import DataError
from data_tools.io import JSON_CELL_COLUMNS, SUFFIXES


def check_output(path: Path, overwrite: bool, inputs: Iterable[Path] = (), suffixes: Iterable[str] = SUFFIXES) -> None:
    """Refuse an output with another extension, one that exists (unless `overwrite`), or one that is an input.

    An input is never replaced, even with `overwrite`: neither a file given as input nor a data file inside an
    input folder (the next run would read the output as input too).
    """
    suffixes = tuple(suffixes)
    if path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise DataError(f"output {path}: unsupported extension {path.suffix or '(none)'!r}; use {names}")
    resolved = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if resolved == source:
            raise DataError(f"output {path} is one of the inputs; choose another output path")
        if source.is_dir() and resolved.is_relative_to(source) and path.suffix.lower() in SUFFIXES:
            raise DataError(
                f"output {path} is inside the input folder {given}: it would replace an input or be read as one "
                "next time; choose a path outside that folder"
            )
    if path.is_dir():
        raise DataError(f"output {path} is a folder; give a file path")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(f"output {path}: {parent} is a file, not a folder")
    if path.exists() and not overwrite:
        raise DataError(f"output {path} already exists; pass --overwrite to replace it")


def write_records(path: Path, rows: Iterable[dict[str, Any]], overwrite: bool = False, inputs=()) -> int:
    """Write rows in the format of `path`'s extension via a temp file + rename, so a failure leaves no half file."""
    check_output(path, overwrite, inputs)
    kind = SUFFIXES[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        n = {"jsonl": _write_jsonl, "json": _write_json, "parquet": _write_parquet, "csv": _write_csv}[kind](tmp, rows)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False)


def _write_jsonl(tmp: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(_dumps(row) + "\n")
            n += 1
    return n


def _write_json(tmp: Path, rows: Iterable[dict[str, Any]]) -> int:
    """One array, one record per line, so `FILE:LINE` in later messages points at the record."""
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        f.write("[")
        for row in rows:
            f.write(("," if n else "") + "\n" + _dumps(row))
            n += 1
        f.write("\n]\n")
    return n


def _write_parquet(tmp: Path, rows: Iterable[dict[str, Any]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # e.g. a field that is a string in one row, a list in another
        raise DataError(f"cannot write these records as parquet ({e}); write .jsonl or .json instead") from None
    pq.write_table(table, tmp)
    return len(rows)


def _write_csv(tmp: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Lists and objects go into JSON text cells, only in the columns the CSV reader decodes (messages, chosen...)."""
    rows = list(rows)
    header = list(dict.fromkeys(k for row in rows for k in row))
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for number, row in enumerate(rows, start=1):
            writer.writerow([_cell(row.get(k), k, number) for k in header])
    return len(rows)


def _cell(value: Any, column: str, number: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        if column not in JSON_CELL_COLUMNS:
            raise DataError(
                f"record {number}: column {column!r} holds a {type(value).__name__}, which a CSV cell cannot keep "
                f"(only {', '.join(JSON_CELL_COLUMNS)} are read back as JSON); write .jsonl, .json or .parquet"
            )
        return _dumps(value)
    if isinstance(value, str) and column in JSON_CELL_COLUMNS and value.lstrip()[:1] in ("[", "{"):
        raise DataError(
            f"record {number}: column {column!r} is text starting with {value.lstrip()[0]!r}, which would read back "
            "from CSV as JSON; write .jsonl, .json or .parquet"
        )
    return str(value)
