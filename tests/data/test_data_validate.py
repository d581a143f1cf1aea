"""Every kind of bad record is reported as `FILE:LINE: reason`, with the exact line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.errors import DataError
from data_tools.validate import load_source, raise_or_report

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}

# (line text, expected reason code, expected detail) — line numbers are the physical lines of the file
BAD_JSONL = [
    (json.dumps({"messages": [U, A]}), None, None),
    ('{"messages": [', "invalid_json", "invalid JSON: Expecting value (column 15)"),
    (json.dumps({"msgs": []}), None, None),  # blank-ish placeholder replaced below
    (
        json.dumps({"messages": [U, {"role": "assistant", "content": "  "}]}),
        "empty_content",
        "messages message 2 (assistant): empty content",
    ),
    (
        json.dumps({"messages": [U, {"role": "assistant", "content": 5}]}),
        "non_string_content",
        "messages message 2 (assistant): content is int, not a string",
    ),
    (
        json.dumps({"messages": [U, U, A]}),
        "roles_not_alternating",
        "roles must alternate user/assistant: message 2 is 'user', expected 'assistant'",
    ),
    (json.dumps({"messages": [U]}), "no_assistant", "no assistant turn"),
    (
        json.dumps({"messages": [{"role": "bot", "content": "x"}, A]}),
        "unknown_role",
        "messages message 1: unknown role 'bot' (use system/user/assistant)",
    ),
    (
        json.dumps({"messages": [U, {"role": "assistant"}]}),
        "missing_field",
        "messages message 2 (assistant): missing field 'content'",
    ),
    ("[1, 2]", "invalid_json", "record is a JSON list, not an object"),
]


def test_jsonl_reasons_with_exact_lines(tmp_path):
    lines = [text for text, _, _ in BAD_JSONL]
    lines[2] = ""  # a blank line is skipped but still counts for line numbers
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_source(str(path), "messages")
    expected = [(reason, f"{path}:{i}: {detail}") for i, (_, reason, detail) in enumerate(BAD_JSONL, start=1) if reason]
    assert loaded.problems == expected
    assert len(loaded.records) == 1 and loaded.records[0]["where"] == f"{path}:1"
    with pytest.raises(DataError) as err:
        raise_or_report(loaded, skip_invalid=False)
    assert err.value.problems == [line for _, line in expected]
    said = []
    raise_or_report(loaded, skip_invalid=True, echo=said.append)
    assert said and f"skipped {len(expected)} invalid record(s)" in said[0]


def test_missing_field_alpaca_and_identical_preference(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "input": ""}])
    assert load_source(str(path)).problems == [("missing_field", f"{path}:2: missing field 'output'")]
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "p.jsonl", pairs)
    loaded = load_source(str(path), kind="preference")
    assert loaded.problems == [("identical_pair", f"{path}:2: chosen and rejected are identical")]


def test_json_array_line_of_each_object(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        '[\n  {"messages": [{"role": "user", "content": "hi"},\n   {"role": "assistant", "content": "yo"}]},\n\n  {"messages": [{"role": "user", "content": "hi"}]}\n]\n'
    )
    assert load_source(str(path)).problems == [("no_assistant", f"{path}:5: no assistant turn")]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]')
    # past a broken value the rest of an array cannot be located: the whole file stops, so nothing is dropped quietly
    with pytest.raises(DataError, match=rf"^{broken}:3: invalid JSON: Expecting property name .*\(column 15\)"):
        load_source(str(broken))


def test_csv_line_and_parquet_row(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('instruction,input,output\nq1,,a1\n"multi\nline",,a2\nq3,,\n')
    assert load_source(str(csv_path)).problems == [("empty_content", f"{csv_path}:5: output: empty content")]
    pq_path = tmp_path / "a.parquet"
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}]
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    assert load_source(str(pq_path)).problems == [("empty_content", f"{pq_path}:row 2: completion: empty content")]
