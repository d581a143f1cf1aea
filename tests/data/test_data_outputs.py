"""Every command that writes data: the extension picks the format, outputs read back whole, inputs are never replaced.

Also: locations name the file the user passed (even when the tokenisation cache holds another file's rows), a BOM
is accepted, and `check_source` stays cheap.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from data_tools.io import check_source, read_records
from data_tools.stats import histogram
from data_tools.validate import load_source
from finetune.cli_data import app

runner = CliRunner()
EXTS = ("jsonl", "json", "parquet", "csv")


def conv(q: str, a: str, system: str | None = None) -> dict:
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + msgs}


ROWS = [conv(f"What is {i} + 1?", f"{i + 1}, «café»") for i in range(20)] + [conv("What is 0 + 1?", "1, «café»")]


def run(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path, write_jsonl) -> Path:
    (tmp_path / "in").mkdir()
    return write_jsonl(tmp_path / "in" / "d.jsonl", ROWS)


@pytest.fixture
def recipe(tmp_path, tokenizer_dir, write_recipe):
    return write_recipe(
        tmp_path / "r.yaml", tokenizer_dir, {"train": [{"path": "builtin:tiny-chat"}], "max_length": 64}
    )


def data_of(path: Path) -> list[dict]:
    return [r.data for r in read_records(str(path))]


@pytest.mark.parametrize("ext", EXTS)
def test_convert_and_dedupe_round_trip(ext, src, tmp_path):
    out = tmp_path / f"conv.{ext}"
    code, text = run("convert", src, "--to", "messages", "-o", out)
    assert code == 0, text
    assert data_of(out) == ROWS  # every record, in order, unchanged
    code, text = run("validate", out)
    assert code == 0 and f"{len(ROWS)} records, {len(ROWS)} valid" in text
    out = tmp_path / f"dedup.{ext}"
    code, text = run("dedupe", src, "-o", out)
    assert code == 0 and "1 duplicates removed" in text, text
    assert data_of(out) == ROWS[:-1]
    assert [r["messages"] for r in load_source(str(out)).records] == [r["messages"] for r in ROWS[:-1]]


@pytest.mark.parametrize("ext", EXTS)
def test_split_round_trip(ext, src, tmp_path):
    code, text = run("split", src, "--eval-fraction", "0.3", "--ext", ext, "-o", tmp_path / "parts")
    assert code == 0, text
    train, held = data_of(tmp_path / "parts" / f"train.{ext}"), data_of(tmp_path / "parts" / f"eval.{ext}")
    assert held and train
    key = json.dumps
    assert sorted(map(key, train + held)) == sorted(map(key, ROWS))


@pytest.mark.parametrize("ext", ("jsonl", "json", "parquet"))
def test_tokenize_round_trip(ext, src, tmp_path, recipe):
    ref = tmp_path / "ref.jsonl"
    assert run("tokenize", src, "--recipe", recipe, "-o", ref)[0] == 0
    out = tmp_path / f"tok.{ext}"
    code, text = run("tokenize", src, "--recipe", recipe, "-o", out)
    assert code == 0, text
    assert data_of(out) == data_of(ref) and len(data_of(ref)) == len(ROWS)


@pytest.mark.parametrize(
    "args",
    [
        ("convert", "{src}", "--to", "messages", "-o", "{out}"),
        ("dedupe", "{src}", "-o", "{out}"),
        ("tokenize", "{src}", "--recipe", "{recipe}", "-o", "{out}"),
    ],
    ids=["convert", "dedupe", "tokenize"],
)
@pytest.mark.parametrize("out_name", ["out.txt", "out", "out.jsonl.gz", "out.yaml"])
def test_other_output_extensions_are_refused(args, out_name, src, tmp_path, recipe):
    before = snapshot(tmp_path)
    code, text = run(*(a.format(src=src, out=tmp_path / out_name, recipe=recipe) for a in args))
    assert code == 2 and f"output {tmp_path / out_name}: unsupported extension" in text
    assert snapshot(tmp_path) == before


def test_tokenize_refuses_csv(src, tmp_path, recipe):
    code, text = run("tokenize", src, "--recipe", recipe, "-o", tmp_path / "t.csv")
    assert code == 2 and "use .jsonl, .json or .parquet" in text and not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("convert", "{input}", "--to", "messages", "-o", "{out}"),
        ("dedupe", "{input}", "-o", "{out}"),
        ("tokenize", "{input}", "--recipe", "{recipe}", "-o", "{out}"),
        ("split", "{input}", "--eval-fraction", "0.5", "-o", "{out_dir}"),
    ],
    ids=["convert", "dedupe", "tokenize", "split"],
)
@pytest.mark.parametrize("given", ["file", "folder"])
def test_overwrite_never_replaces_an_input(args, given, src, tmp_path, recipe, write_jsonl):
    """--overwrite may replace an old output, never an input: not the input file, not a file in an input folder."""
    second = write_jsonl(tmp_path / "in" / "train.jsonl", ROWS[:3])  # split's train.jsonl lands on it
    before = snapshot(tmp_path)
    if given == "file":  # the output is the input file itself
        values = {"input": second if args[0] == "split" else src, "out": src}
    else:  # the output is (or would be) a data file inside the input folder
        values = {"input": src.parent, "out": second}
    code, text = run(*(a.format(**values, out_dir=src.parent, recipe=recipe) for a in args), "--overwrite")
    assert code == 2, text
    assert "is one of the inputs" in text or "is inside the input folder" in text
    assert snapshot(tmp_path) == before


def test_stats_plot_is_not_written_over_an_input_or_an_existing_file(src, tmp_path, recipe):
    code, text = run("stats", src.parent, "--recipe", recipe, "--plot", src, "--overwrite")
    assert code == 2 and "unsupported extension '.jsonl'; use .png, .svg or .pdf" in text
    assert src.read_bytes().startswith(b'{"messages"')
    png = src.parent / "lengths.png"  # an old plot (no input: only data files are read from a folder)
    png.write_bytes(b"old")
    code, text = run("stats", src.parent, "--recipe", recipe, "--plot", png)
    assert code == 2 and "already exists; pass --overwrite" in text and png.read_bytes() == b"old"
    code, text = run("stats", src.parent, "--recipe", recipe, "--plot", png, "--overwrite")
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("ext", ("jsonl", "json", "csv"))
def test_utf8_bom_is_accepted(ext, tmp_path):
    path = tmp_path / f"bom.{ext}"
    rows = [{"instruction": "Say «hi»", "output": "hi"}, {"instruction": "Say bye", "output": "bye"}]
    if ext == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif ext == "json":
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded = load_source(str(path))
    assert loaded.format == "alpaca" and not loaded.problems
    assert [r["messages"][0]["content"] for r in loaded.records] == ["Say «hi»", "Say bye"]
    assert run("validate", path) == (0, "2 records, 2 valid, 0 invalid\n")


def test_locations_name_the_file_passed_even_from_the_cache(tmp_path, recipe, write_jsonl):
    """Two files with equal content share the tokenisation cache; each still reports its own path."""
    rows = [conv("What is 1 + 1?", "2"), conv("Say hi", "hi")]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = (write_jsonl(tmp_path / d / "same.jsonl", rows) for d in ("a", "b"))
    for path in (first, second):  # the second reads the first one's cached rows
        out = tmp_path / f"{path.parent.name}.json"
        code, text = run("tokenize", path, "--recipe", recipe, "-o", out)
        assert code == 0, text
        assert [r["where"] for r in data_of(out)] == [f"{path}:1", f"{path}:2"]
        code, text = run("preview", path, "--recipe", recipe, "-n", "2")
        assert code == 0 and f"{path}:1" in text.replace("\n", "")
        other = first if path == second else second
        assert str(other) not in text.replace("\n", "")


def test_stats_counts_system_tokens_and_explains_other(tmp_path, recipe, write_jsonl, mistral_instruct):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest

    system = "You are a terse assistant."
    rows = [conv(f"Q {i}?", f"A {i}", system=system) for i in range(3)] + [conv("Q?", "A")]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    code, text = run("stats", path, "--recipe", recipe, "--json")
    assert code == 0, text
    roles = json.loads(text[text.index('{\n  "records"') : text.rindex("}") + 1])["tokens_per_role"]  # after the bar

    def n_tokens(msgs, system_prompt):  # mistral-common, the oracle, with and without the system prompt
        request = InstructRequest(messages=msgs, system_prompt=system_prompt)
        return len(mistral_instruct.encode_instruct(request).tokens)

    expected_system = 0
    for i in range(3):
        msgs = [UserMessage(content=f"Q {i}?"), AssistantMessage(content=f"A {i}")]
        expected_system += n_tokens(msgs, system) - n_tokens(msgs, None)
    assert roles["system"] == expected_system > 0
    assert roles["other"] == len(rows)  # one BOS per record
    code, text = run("stats", path, "--recipe", recipe)
    assert f"system {expected_system}" in text and f"other {len(rows)} (BOS and chat-format tokens)" in text


@pytest.mark.parametrize("lengths", [[15, 16, 17, 18, 40], list(range(3, 200, 7)), [5, 5, 5], [1, 1000]])
def test_histogram_buckets_never_overlap(lengths):
    buckets = histogram(np.array(lengths))
    assert sum(c for _, _, c in buckets) == len(lengths)
    for (lo, hi, _), (next_lo, _, _) in itertools.pairwise(buckets):
        assert lo <= hi == next_lo - 1  # integer buckets, high inclusive, no shared value
    for lo, hi, c in buckets:
        assert c == sum(lo <= x <= hi for x in lengths)


def test_check_source_is_cheap_but_full_reads_catch_the_rest(tmp_path, write_jsonl):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    assert check_source(str(good)) == [] and check_source("builtin:tiny-chat") == []
    late = tmp_path / "late.jsonl"  # a latin-1 byte past the first 64 KB: not sniffed, but reading names it
    late.write_bytes(good.read_bytes() * 400 + b'{"text": "caf\xe9"}\n')
    assert late.stat().st_size > 64 * 1024 and check_source(str(late)) == []
    from data_tools.errors import DataError

    with pytest.raises(DataError, match=rf"^{late}:{len(ROWS) * 400 + 1}: not UTF-8 text \(byte 0xe9 at column 14\)"):
        load_source(str(late))
    assert check_source("org/some-dataset") == []  # a hub id: not checkable offline
