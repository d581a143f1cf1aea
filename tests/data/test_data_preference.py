"""Preference data (DPO pairs, KTO unpaired records): formats, validation with FILE:LINE, the data-kind check, and
token ids equal to mistral-common's `encode_instruct` for prompt + chosen, prompt + rejected, prompt + completion."""

from __future__ import annotations

import json
import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest

from data_tools.chat import FormatSpec
from data_tools.config import DataConfig
from data_tools.errors import DataError
from data_tools.formats import detect_format, to_unpaired, unpair
from data_tools.preference import tokenize_preference, truncate
from data_tools.prepare import check_data_kind, prepare_data
from data_tools.validate import load_source
from finetune.model.tiny import mistral_v1_tokenizer_file

PIECES = ["What is 2 + 2?", "日本語で答えて", "emoji 😀", "[INST]", "[/INST]", "<s>", "</s>", "a\n\nb", "  x", "42"]


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))


def random_pair(rng: random.Random) -> dict:
    prompt = []
    if rng.random() < 0.3:
        prompt.append({"role": "system", "content": text(rng)})
    for _ in range(rng.randint(0, 2)):  # earlier turns
        prompt += [{"role": "user", "content": text(rng)}, {"role": "assistant", "content": text(rng)}]
    prompt.append({"role": "user", "content": text(rng)})
    chosen, rejected = text(rng), text(rng)
    if chosen.strip() == rejected.strip():
        rejected += " no"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def reference(instruct, messages: list[dict], system: str | None = None) -> list[int]:
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    msgs = [UserMessage(content=m["content"]) if m["role"] == "user" else AssistantMessage(content=m["content"])
            for m in messages]  # fmt: skip
    return instruct.encode_instruct(InstructRequest(messages=msgs, system_prompt=system)).tokens


def spec(system: str | None = None) -> FormatSpec:
    return FormatSpec("mistral", "assistant", system, str(mistral_v1_tokenizer_file()))


@pytest.mark.parametrize("recipe_system", [None, "Be brief."])
def test_pair_ids_equal_mistral_common(tmp_path, write_jsonl, tokenizer, mistral_instruct, recipe_system):
    rng = random.Random(7)
    path = write_jsonl(tmp_path / "pairs.jsonl", [random_pair(rng) for _ in range(150)])
    records = load_source(str(path), kind="preference").records
    assert len(records) == 150
    ds = tokenize_preference(records, "dpo", spec(recipe_system), tokenizer, 4096)
    for record, row in zip(records, ds, strict=True):
        prompt = record["prompt"]
        # prompt ids: the instruct encoding up to and including the final [/INST]
        assert row["prompt_ids"] == reference(mistral_instruct, prompt, recipe_system)
        assert row["prompt_ids"][-4:] == [733, 28748, 16289, 28793]  # " [/INST]"
        for side in ("chosen", "rejected"):
            full = reference(mistral_instruct, prompt + record[side], recipe_system)
            assert row["prompt_ids"] + row[f"{side}_ids"] == full  # EOS included, as mistral-common ends a reply
            assert row[f"{side}_ids"] == mistral_instruct.tokenizer.encode(record[side][0]["content"], False, True)
        assert not row["truncated"] and row["where"] == record["where"]


def test_unpaired_ids_equal_mistral_common(tmp_path, write_jsonl, tokenizer, mistral_instruct):
    rng = random.Random(8)
    rows = []
    for i in range(80):
        pair = random_pair(rng)
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": i % 3 == 0})
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    loaded = load_source(str(path), kind="auto")
    assert loaded.format == "unpaired" and not loaded.problems
    ds = tokenize_preference(loaded.records, "kto", spec(), tokenizer, 4096)
    for raw, row in zip(rows, ds, strict=True):
        completion = [{"role": "assistant", "content": raw["completion"]}]
        assert row["prompt_ids"] + row["completion_ids"] == reference(mistral_instruct, raw["prompt"] + completion)
        assert row["completion_ids"][-1] == 2 and row["label"] is raw["label"]


def test_unpaired_format_detected_and_converted():
    record = {"prompt": "2+2?", "completion": "4", "label": True}
    assert detect_format(record) == "unpaired"
    assert detect_format({"prompt": "2+2?", "completion": "4"}) == "prompt_completion"
    canon = to_unpaired(record, "unpaired")
    assert canon == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
        "label": True,
    }
    assert to_unpaired({**record, "label": "False"}, "unpaired")["label"] is False  # CSV cells hold text
    pair = {
        "prompt": canon["prompt"],
        "chosen": canon["completion"],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    good, bad = unpair({**pair, "where": "f:1"})
    assert (good["completion"], good["label"], bad["completion"], bad["label"]) == (
        pair["chosen"],
        True,
        pair["rejected"],
        False,
    )
    assert good["where"] == bad["where"] == "f:1"


def test_bad_records_reported_with_file_line(tmp_path, write_jsonl, tokenizer, tiny_model_dir):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": " same ", "rejected": "same"},
            {"chosen": "a", "rejected": "b"},
            {"prompt": "", "chosen": "a", "rejected": "b"},
        ],
    )
    unpaired = write_jsonl(
        tmp_path / "unpaired.jsonl",
        [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": "yes"}],
    )
    cfg = DataConfig(train=[{"path": str(pairs)}, {"path": str(unpaired)}])
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="kto")
    assert err.value.problems == [
        f"{pairs}:2: chosen and rejected are identical",
        f"{pairs}:3: missing field 'prompt'",
        f"{pairs}:4: prompt: empty content",
        f"{unpaired}:2: label must be true (desirable) or false (undesirable), got 'yes'",
    ]


def test_data_kind_mismatch_names_the_found_format(tmp_path, write_jsonl, tokenizer, tiny_model_dir):
    chat = DataConfig(train=[{"path": "builtin:tiny-chat"}])
    (line,) = check_data_kind(chat, "dpo")
    assert line.startswith("data.train[0]: builtin:tiny-chat is in messages format")
    assert "method: dpo needs preference pairs" in line and "tiny_chat.jsonl:1" in line
    with pytest.raises(DataError, match="is in messages format") as err:
        prepare_data(chat, tokenizer, model_dir=tiny_model_dir, seed=0, method="dpo")
    assert "\n" not in str(err.value)  # one line
    pairs = DataConfig(train=[{"path": "builtin:tiny-preference"}], eval={"path": "builtin:tiny-unpaired"})
    assert [p.split(":")[0] for p in check_data_kind(pairs, "sft")] == ["data.train[0]", "data.eval"]
    assert "is in preference format" in check_data_kind(pairs, "sft")[0]
    assert "is in unpaired format" in check_data_kind(pairs, "dpo")[0] and len(check_data_kind(pairs, "dpo")) == 1
    assert check_data_kind(pairs, "kto") == []
    assert check_data_kind(chat, "sft") == []
    forced = DataConfig(train=[{"path": "builtin:tiny-preference", "format": "messages"}])
    assert "is in messages format" in check_data_kind(forced, "dpo")[0]
    assert "data.train[0].format" in check_data_kind(forced, "dpo")[0]
    # unreadable or undetectable sources are left to the loader (which names FILE:LINE)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    missing = DataConfig(train=[{"path": str(tmp_path / "nope.jsonl")}, {"path": str(odd)}])
    assert check_data_kind(missing, "dpo") == []


def test_truncation_keeps_bos_and_prompt_end():
    prompt, chosen, rejected = [1, *range(100, 120)], list(range(200, 206)), list(range(300, 303))
    p, (c, r), cut = truncate(prompt, [chosen, rejected], 16, bos_id=1)
    assert cut and p[0] == 1 and p[1:] == prompt[-9:] and c == chosen and r == rejected
    assert len(p) + len(c) == 16
    # a long completion: the prompt keeps half of max_length, the completions their start
    p, (c,), cut = truncate(prompt, [list(range(500, 540))], 16, bos_id=1)
    assert cut and p == [1, *prompt[-7:]] and c == list(range(500, 508))
    assert truncate(prompt, [chosen], 64, bos_id=1) == (prompt, [chosen], False)


def test_prepared_data_truncates_counts_and_stays_in_max_length(tokenizer, tiny_model_dir):
    cfg = DataConfig(train=[{"path": "builtin:tiny-preference", "samples": 60}], max_length=28)
    prepared = prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="dpo")
    stats = prepared.stats
    assert 0 < stats["truncated"] < 60
    for row in prepared.train:
        assert row["prompt_ids"][0] == 1
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 28
    assert stats["prompt_tokens_mean"] > 0 and stats["chosen_tokens_mean"] > stats["rejected_tokens_mean"]


def test_kto_takes_pairs_and_keeps_both_halves_on_one_side(tokenizer, tiny_model_dir):
    cfg = DataConfig(train=[{"path": "builtin:tiny-preference"}], eval_fraction=0.2)
    prepared = prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="kto")
    train, held = prepared.train, prepared.eval
    assert train.column_names == ["prompt_ids", "completion_ids", "label"]
    assert prepared.stats["desirable"] == prepared.stats["undesirable"] == len(train) // 2
    train_prompts = {tuple(p) for p in train["prompt_ids"]}
    assert not train_prompts & {tuple(p) for p in held["prompt_ids"]}
    assert len(train) + len(held) == 800


def test_chatml_prompt_is_the_generation_prompt(tmp_path, write_jsonl, tokenizer, tiny_model_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    cfg = DataConfig(train=[{"path": str(path)}], chat_format="chatml")
    row = prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="dpo").train[0]
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]).endswith("4<|im_end|>\n")


def test_shipped_samples_are_valid_balanced_and_learnable(tokenizer):
    from data_tools.samples.make_tiny_preference import SIGN_OFF

    pairs = load_source("builtin:tiny-preference", kind="auto")
    unpaired = load_source("builtin:tiny-unpaired", kind="auto")
    assert (pairs.format, unpaired.format) == ("preference", "unpaired")
    assert not pairs.problems and not unpaired.problems and len(pairs.records) == len(unpaired.records) == 400
    assert all(r["chosen"][0]["content"].endswith(SIGN_OFF) for r in pairs.records)
    assert not any(SIGN_OFF in r["rejected"][0]["content"] for r in pairs.records)
    for r in unpaired.records:
        assert r["completion"][0]["content"].endswith(SIGN_OFF) == r["label"]
    assert sum(r["label"] for r in unpaired.records) == 200
    ds = tokenize_preference(pairs.records, "dpo", spec(), tokenizer, 4096)
    lengths = [len(p) + len(c) for p, c in zip(ds["prompt_ids"], ds["chosen_ids"], strict=True)]
    assert max(lengths) < 64
    assert sum(len(r["prompt"]) > 1 for r in pairs.records) >= 20  # multi-turn or system prompts too


def test_generator_reproduces_the_shipped_files(tmp_path, monkeypatch):
    from data_tools.io import BUILTINS
    from data_tools.samples import make_tiny_preference as gen

    monkeypatch.setattr(gen, "PAIRS_OUT", tmp_path / "p.jsonl")
    monkeypatch.setattr(gen, "UNPAIRED_OUT", tmp_path / "u.jsonl")
    gen.main()
    assert (tmp_path / "p.jsonl").read_bytes() == BUILTINS["tiny-preference"].read_bytes()
    assert (tmp_path / "u.jsonl").read_bytes() == BUILTINS["tiny-unpaired"].read_bytes()
    assert json.loads(BUILTINS["tiny-unpaired"].read_text().splitlines()[0])["label"] in (True, False)
