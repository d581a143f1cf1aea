"""prepare_sft_data: validation first, stats, mixing by weight/samples, eval hold-out, cache reuse."""

from __future__ import annotations

import pytest

from data_tools import pipeline
from data_tools.config import DataConfig
from data_tools.errors import DataError
from data_tools.hygiene import content_hash, in_eval
from data_tools.pipeline import prepare_sft_data
from data_tools.validate import load_source


def conv(i: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
    }


@pytest.fixture
def two_sources(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"Echo {i}", "output": f"{i}"} for i in range(10)])
    return a, b


def test_stats_mixing_and_eval(two_sources, tokenizer, tokenizer_dir, tmp_path):
    a, b = two_sources
    cfg = DataConfig(
        train=[{"path": str(a), "weight": 0.5}, {"path": str(b), "samples": 25}], eval_fraction=0.2, max_length=64
    )
    p = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=1, cache_dir=tmp_path / "c")
    s = p.stats
    assert s["records_total"] == 50 and s["records_skipped"] == 0
    held = s["eval_records"]
    assert 0 < held < 50 and len(p.eval) == held
    assert s["train_records"] == len(p.train)
    kept = {}
    for src in (a, b):  # records each source keeps after the content-hash hold-out
        records = load_source(str(src)).records
        kept[src] = sum(not in_eval(content_hash(r), cfg.shuffle_seed, 0.2) for r in records)
    assert held == 50 - kept[a] - kept[b]
    assert s["train_records"] == round(kept[a] * 0.5) + 25  # a: half of what it kept; b: exactly 25 (repeats)
    assert s["trained_tokens"] == sum(sum(x != -100 for x in r["labels"]) for r in p.train)
    assert s["train_tokens"] == sum(len(r["input_ids"]) for r in p.train)
    assert s["packing_efficiency"] is None and p.trainer_kwargs["dataset_kwargs"] == {"skip_prepare_dataset": True}
    again = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=2, cache_dir=tmp_path / "c")
    assert again.train["input_ids"] == p.train["input_ids"] and again.eval["input_ids"] == p.eval["input_ids"]


def test_exact_sample_counts(two_sources, tokenizer, tokenizer_dir, tmp_path):
    a, b = two_sources
    cfg = DataConfig(train=[{"path": str(a), "samples": 7}, {"path": str(b), "weight": 2.0}], max_length=64)
    p = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c")
    assert p.stats["train_records"] == 7 + 20


def test_invalid_records_stop_or_are_counted(tmp_path, write_jsonl, tokenizer, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(1), {"messages": [{"role": "user", "content": "x"}]}, conv(2)])
    cfg = DataConfig(train=[{"path": str(path)}], max_length=64)
    with pytest.raises(DataError) as err:
        prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c")
    assert err.value.problems == [f"{path}:2: no assistant turn"]
    said = []
    cfg = DataConfig(train=[{"path": str(path)}], max_length=64, skip_invalid=True)
    p = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c", echo=said.append)
    assert p.stats["records_skipped"] == 1 and p.stats["skipped_by_reason"] == {"no_assistant": 1}
    assert p.stats["train_records"] == 2 and said


def test_truncation_is_counted_and_fully_masked_records_dropped(tmp_path, write_jsonl, tokenizer, tokenizer_dir):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv(1), long_prompt])
    cfg = DataConfig(train=[{"path": str(path)}], max_length=32)
    p = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c")
    assert p.stats["truncated"] == 1 and p.stats["dropped_no_trained_tokens"] == 1
    assert p.stats["train_records"] == 1 and all(len(r) <= 32 for r in p.train["input_ids"])


def test_second_run_reuses_the_tokenisation_cache(two_sources, tokenizer, tokenizer_dir, tmp_path, monkeypatch):
    calls = []
    real = pipeline.encode_batch

    def counting(batch, **kwargs):
        calls.append(len(batch["messages"]))
        return real(batch, **kwargs)

    monkeypatch.setattr(pipeline, "encode_batch", counting)
    a, _ = two_sources
    cfg = DataConfig(train=[{"path": str(a)}], max_length=64)
    first = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c")
    assert sum(calls) == 40
    assert list((tmp_path / "c").glob("tokenized-*.arrow"))
    second = prepare_sft_data(cfg, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c")
    assert sum(calls) == 40  # nothing tokenised again
    assert second.train["labels"] == first.train["labels"]
    changed = DataConfig(train=[{"path": str(a)}], max_length=64, train_on="all")
    prepare_sft_data(changed, tokenizer, model_dir=tokenizer_dir, seed=0, cache_dir=tmp_path / "c")
    assert sum(calls) == 80  # a different mask setting is a different cache entry


def test_config_rejects_bad_settings():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DataConfig(train=[{"path": "x", "weight": 1.0, "samples": 3}])
    with pytest.raises(ValidationError):
        DataConfig(train=[{"path": "x"}], unknown_key=1)
    with pytest.raises(ValidationError):
        DataConfig(train=[{"path": "x", "format": "yaml"}])


def test_preference_data_tokenised_with_skips_and_holdout(tmp_path, write_jsonl, tokenizer, tiny_model_dir):
    from data_tools.prepare import prepare_data

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
    rows.append({"prompt": "q", "chosen": "same", "rejected": "same"})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(train=[{"path": str(path)}], eval_fraction=0.2)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="dpo")
    assert err.value.problems == [f"{path}:31: chosen and rejected are identical"]
    cfg = DataConfig(train=[{"path": str(path)}], eval_fraction=0.2, skip_invalid=True)
    prepared = prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="dpo", echo=lambda _: None)
    stats = prepared.stats
    assert stats["records_skipped"] == 1 and stats["skipped_by_reason"] == {"identical_pair": 1}
    assert len(prepared.train) + len(prepared.eval) == 30 == stats["train_records"] + stats["eval_records"]
    assert prepared.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert stats["pairs"] == len(prepared.train) and stats["truncated"] == 0
