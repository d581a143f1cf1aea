"""A corpus of data-file mistakes, each run through `finetune data validate` and the run's `prepare_sft_data`.

Every case must stop with exit code 2 / DataError, no traceback, a message naming the file (and the line where there
is one), and nothing written. One parametrised test per kind of mistake.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from data_tools.config import DataConfig, SourceConfig
from data_tools.errors import DataError
from data_tools.io import check_source
from data_tools.pipeline import prepare_sft_data
from finetune.cli_data import app

runner = CliRunner()


def conv(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i} café"}, {"role": "assistant", "content": f"a{i}"}]}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


ROWS = [conv(i) for i in range(4)]
CSV_TEXT = 'instruction,input,output\nq1,,a1\n"q2 café",,a2\n'


def at(text: str, needle: str) -> str:
    """`LINE: not UTF-8 text (byte 0xNN at column C)` for the first `needle` (one latin-1 byte) in `text`."""
    i = text.index(needle)
    line, col = text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1
    return f"{line}: not UTF-8 text (byte 0x{needle.encode('latin-1')[0]:02x} at column {col})"


def last_line(text: str) -> int:
    return text.rstrip("\n").count("\n") + 1


JSONL_TEXT = jsonl(ROWS).decode()
JSON_TEXT = json.dumps(ROWS, indent=1, ensure_ascii=False)
TWO_ARRAYS = json.dumps(ROWS[:2], indent=1) + json.dumps(ROWS[2:])
# (case id, file name, content, expected message with {f} for the file's path); content: bytes or str (UTF-8)
ENCODING = [
    ("latin1-jsonl", "d.jsonl", JSONL_TEXT.encode("latin-1"), "{f}:" + at(JSONL_TEXT, "é")),
    ("latin1-csv", "d.csv", CSV_TEXT.encode("latin-1"), "{f}:" + at(CSV_TEXT, "é")),
    ("latin1-json", "d.json", JSON_TEXT.encode("latin-1"), "{f}:" + at(JSON_TEXT, "é")),
    ("gzip-jsonl", "d.jsonl", gzip.compress(jsonl(ROWS)), "{f}: gzip-compressed file; decompress it first"),
    ("gzip-csv", "d.csv", gzip.compress(CSV_TEXT.encode()), "{f}: gzip-compressed file; decompress it first"),
    ("gzip-parquet", "d.parquet", gzip.compress(b"PAR1 not really"), "{f}: gzip-compressed file; decompress it first"),
    ("utf16-bom-jsonl", "d.jsonl", jsonl(ROWS).decode().encode("utf-16"), "{f}:1: not UTF-8 text (UTF-16 byte-order mark"),
    ("utf16-nobom-jsonl", "d.jsonl", jsonl(ROWS).decode().encode("utf-16-le"), "{f}:1: not UTF-8 text (byte 0x00 at column 2) (UTF-16"),
    ("utf16-bom-json", "d.json", json.dumps(ROWS).encode("utf-16"), "{f}:1: not UTF-8 text (UTF-16 byte-order mark"),
    ("utf32-csv", "d.csv", CSV_TEXT.encode("utf-32"), "{f}:1: not UTF-8 text (UTF-32 byte-order mark"),
]  # fmt: skip

EMPTY = [
    ("zero-byte-jsonl", "d.jsonl", b"", "{f}: empty file (0 records)"),
    ("whitespace-jsonl", "d.jsonl", b"\n  \n\t\n", "{f}: empty file (0 records)"),
    ("bom-only-jsonl", "d.jsonl", b"\xef\xbb\xbf\n", "{f}: empty file (0 records)"),
    ("zero-byte-json", "d.json", b"", "{f}: empty file (0 records)"),
    ("whitespace-json", "d.json", b" \n\n", "{f}: no records (an empty JSON array, or only whitespace)"),
    ("empty-array-json", "d.json", b"[ ]\n", "{f}: no records (an empty JSON array, or only whitespace)"),
    ("zero-byte-csv", "d.csv", b"", "{f}: empty file (0 records)"),
    ("header-only-csv", "d.csv", b"\xef\xbb\xbfinstruction,input,output\n", "{f}: no records (only a header line)"),
    ("zero-byte-parquet", "d.parquet", b"", "{f}: empty file (0 records)"),
    ("zero-row-parquet", "d.parquet", "PARQUET:0", "{f}: no records (0 rows)"),
]

MULTI_VALUE = [
    ("jsonl-saved-as-json", "d.json", jsonl(ROWS), "{f}:2: a second JSON value starts here"),
    ("second-array-appended", "d.json", TWO_ARRAYS, f"{{f}}:{last_line(TWO_ARRAYS)} (column 2): a second JSON array"),
    ("array-then-object", "d.json", json.dumps(ROWS) + "\n" + json.dumps(ROWS[0]), "{f}:2: unexpected text after"),
    ("array-not-closed", "d.json", "[\n" + json.dumps(ROWS[0]) + ",\n", "{f}:3: the JSON array is not closed"),
    (
        "missing-comma",
        "d.json",
        "[\n" + json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n]",
        "{f}:3: invalid JSON",
    ),
    ("broken-element", "d.json", "[\n" + json.dumps(ROWS[0]) + ',\n{"messages": [}\n]', "{f}:3: invalid JSON"),
]

PATHS = [  # path given → expected message ({d}: the case's folder)
    ("empty-string", "", "data path is empty"),
    ("blank-string", "  ", "data path is empty"),
    ("missing-file", "{d}/nope.jsonl", "data file not found: {d}/nope.jsonl"),
    ("txt-file", "{d}/notes.txt", "unsupported data file type '.txt' ({d}/notes.txt); use .jsonl, .json, .parquet or .csv"),
    ("yaml-file", "{d}/data.yaml", "unsupported data file type '.yaml'"),
    ("folder-without-data", "{d}", "no .jsonl, .json, .parquet or .csv files in folder {d} (found only: .txt, .yaml)"),
    ("empty-folder", "{d}/empty", "no .jsonl, .json, .parquet or .csv files in folder {d}/empty (it is empty)"),
]  # fmt: skip

ALPACA = [{"instruction": f"Echo {i}", "output": str(i)} for i in range(6)]
MIXED = [  # the format of a file changes partway: say so, instead of "missing field 'instruction'"
    ("messages-in-alpaca", "d.jsonl", jsonl([*ALPACA, conv(7)]), "{f}:7: this record is in messages format, but {f} was read as alpaca (detected from {f}:1)"),
    ("alpaca-in-messages", "d.json", f"[\n{json.dumps(conv(1))},\n{json.dumps(ALPACA[0])}\n]", "{f}:3: this record is in alpaca"),
    ("pc-in-text", "d.jsonl", jsonl([{"text": "a"}, {"prompt": "p", "completion": "c"}]), "{f}:2: this record is in prompt_completion format, but {f} was read as text"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_case(folder: Path, name: str, content) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if content == "PARQUET:0":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def assert_refused(source: str, expected: str, tmp_path: Path, tokenizer, tokenizer_dir) -> None:
    """validate exits 2 with the message and no traceback; prepare_sft_data raises it; nothing is written."""
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["validate", source])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert expected in result.output, result.output
    # built without validation, so this checks the function's own guard (the recipe may refuse some paths first)
    cfg = DataConfig.model_construct(train=[SourceConfig.model_construct(path=source)], max_length=64)
    with pytest.raises(DataError) as err:
        prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "cache")
    assert expected in str(err.value)
    assert snapshot(tmp_path) == before  # nothing written, no cache filled


def ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case", ENCODING, ids=ids(ENCODING))
def test_not_utf8_text(case, tmp_path, tokenizer, tokenizer_dir):
    _, name, content, expected = case
    f = write_case(tmp_path / "data", name, content)
    assert_refused(str(f), expected.format(f=f), tmp_path, tokenizer, tokenizer_dir)
    assert check_source(str(f)) and check_source(str(f))[0].startswith(expected.format(f=f))


@pytest.mark.parametrize("case", EMPTY, ids=ids(EMPTY))
def test_empty_file(case, tmp_path, tokenizer, tokenizer_dir):
    _, name, content, expected = case
    f = write_case(tmp_path / "data", name, content)
    assert_refused(str(f), expected.format(f=f), tmp_path, tokenizer, tokenizer_dir)
    # inside a folder with a good file, an empty file is still named (not silently read as 0 records)
    write_case(tmp_path / "data", "good.jsonl", jsonl(ROWS))
    assert_refused(str(tmp_path / "data"), expected.format(f=f), tmp_path, tokenizer, tokenizer_dir)


@pytest.mark.parametrize("case", MULTI_VALUE, ids=ids(MULTI_VALUE))
def test_json_file_with_more_than_one_value(case, tmp_path, tokenizer, tokenizer_dir):
    _, name, content, expected = case
    f = write_case(tmp_path / "data", name, content)
    assert_refused(str(f), expected.format(f=f), tmp_path, tokenizer, tokenizer_dir)


@pytest.mark.parametrize("case", PATHS, ids=ids(PATHS))
def test_bad_paths(case, tmp_path, tokenizer, tokenizer_dir):
    _, given, expected = case
    d = tmp_path / "data"
    write_case(d, "notes.txt", "hello\n")
    write_case(d, "data.yaml", "a: 1\n")
    (d / "empty").mkdir()
    source = given.format(d=d)
    assert_refused(source, expected.format(d=d), tmp_path, tokenizer, tokenizer_dir)
    assert any(expected.format(d=d) in p for p in check_source(source))


@pytest.mark.parametrize("case", MIXED, ids=ids(MIXED))
def test_format_changes_partway(case, tmp_path, tokenizer, tokenizer_dir):
    _, name, content, expected = case
    f = write_case(tmp_path / "data", name, content)
    assert_refused(str(f), expected.format(f=f), tmp_path, tokenizer, tokenizer_dir)
    result = runner.invoke(app, ["validate", str(f)])
    assert f"(detected from {f}:" in result.output and "in another format than the file: 1" in result.output
