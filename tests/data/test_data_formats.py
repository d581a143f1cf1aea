"""Every input format and file type converts to the canonical forms."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.errors import DataError
from data_tools.formats import detect_format, parse_hh, to_conversation, to_preference
from data_tools.validate import load_source

CONV = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]

RECORDS = {
    "messages": {"messages": CONV},
    "alpaca": {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
    "prompt_completion": {"prompt": "What is 2 + 2?", "completion": "4"},
    "preference": {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    "hh_rlhf": {
        "chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5",
    },
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_detects_and_converts(tmp_path, fmt, write_jsonl):
    record = RECORDS[fmt]
    assert detect_format(record) == fmt
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [record, record])
    loaded = load_source(str(path))
    assert loaded.format == fmt and not loaded.problems
    assert [r["messages"] for r in loaded.records] == [CONV, CONV]
    assert loaded.records[1]["where"] == f"{path}:2"


def test_text_and_alpaca_input_and_system():
    assert to_conversation({"text": "hello world"}, "text") == [{"role": "assistant", "content": "hello world"}]
    conv = to_conversation(
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."}, "alpaca"
    )
    assert conv == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]


def test_preference_forms_agree():
    expected = {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    assert to_preference(RECORDS["preference"], "preference") == expected
    assert to_preference(RECORDS["hh_rlhf"], "hh_rlhf") == expected
    as_lists = {"chosen": CONV, "rejected": [CONV[0], {"role": "assistant", "content": "5"}]}
    assert to_preference(as_lists, "preference") == expected
    explicit = {"prompt": [CONV[0]], "chosen": [CONV[1]], "rejected": [{"role": "assistant", "content": "5"}]}
    assert to_preference(explicit, "preference") == expected


def test_hh_multi_turn():
    msgs = parse_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 1+1?\n\nAssistant: 2", "chosen")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[-1]["content"] == "2"


def test_json_csv_parquet_and_folder(tmp_path):
    rows = [RECORDS["alpaca"], {"instruction": "Say hi", "input": "", "output": "hi"}]
    (tmp_path / "d").mkdir()
    json_path = tmp_path / "d" / "a.json"
    json_path.write_text(json.dumps(rows, indent=2))
    csv_path = tmp_path / "d" / "b.csv"
    csv_path.write_text('instruction,input,output\n"What is 2 + 2?",,4\nSay hi,,hi\n')
    pq_path = tmp_path / "d" / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    for path in (json_path, csv_path, pq_path):
        loaded = load_source(str(path))
        assert loaded.format == "alpaca" and not loaded.problems
        assert [r["messages"][1]["content"] for r in loaded.records] == ["4", "hi"]
    folder = load_source(str(tmp_path / "d"))
    assert len(folder.records) == 6
    assert folder.records[0]["where"] == f"{json_path}:2"  # the first object starts on line 2 of the array
    assert folder.records[3]["where"] == f"{csv_path}:3"  # header is line 1
    assert folder.records[5]["where"] == f"{pq_path}:row 2"  # rows count from 1, like lines


def test_csv_with_json_messages(tmp_path):
    path = tmp_path / "m.csv"
    cell = json.dumps(CONV).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n')
    assert load_source(str(path)).records[0]["messages"] == CONV


def test_builtin_and_unknown(tmp_path, write_jsonl):
    assert len(load_source("builtin:tiny-chat").records) >= 300
    with pytest.raises(DataError, match="unknown built-in"):
        load_source("builtin:nope")
    with pytest.raises(DataError, match="not found"):
        load_source(str(tmp_path / "missing.jsonl"))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="cannot detect the format"):
        load_source(str(odd))
