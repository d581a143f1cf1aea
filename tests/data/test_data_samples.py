"""The shipped sample: deterministic generator, valid, sized for a tiny model on CPU."""

from __future__ import annotations

import hashlib

from data_tools.chat import FormatSpec, MistralEncoder
from data_tools.io import BUILTINS
from data_tools.samples import make_tiny_chat
from data_tools.validate import load_source
from finetune.model.tiny import mistral_v1_tokenizer_file


def test_generator_reproduces_the_shipped_file(tmp_path, monkeypatch):
    shipped = BUILTINS["tiny-chat"]
    monkeypatch.setattr(make_tiny_chat, "OUT", tmp_path / "tiny_chat.jsonl")
    make_tiny_chat.main()
    digest = hashlib.sha256((tmp_path / "tiny_chat.jsonl").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_sample_is_valid_short_and_bilingual():
    loaded = load_source("builtin:tiny-chat")
    assert not loaded.problems and 300 <= len(loaded.records) <= 600
    enc = MistralEncoder(FormatSpec("mistral", "assistant", None, str(mistral_v1_tokenizer_file())))
    lengths = [len(enc.encode(r["messages"])[0]) for r in loaded.records]
    assert sum(n < 100 for n in lengths) / len(lengths) > 0.95
    text = " ".join(m["content"] for r in loaded.records for m in r["messages"])
    assert any("\u3040" <= ch <= "\u30ff" for ch in text)  # Japanese kana
    assert sum(len(r["messages"]) > 2 for r in loaded.records) >= 10  # some multi-turn
