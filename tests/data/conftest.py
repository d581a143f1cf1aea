"""Shared fixtures for the data pipeline tests: the real Mixtral v1 tokenizer and a tiny Mixtral, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_DIMS = {"hidden_size": 32, "intermediate_size": 64, "layers": 1}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from finetune.model.tiny import write_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.pad_token = tok.unk_token  # Mixtral convention: pad = <unk> (id 0), never EOS
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from finetune.model.tiny import TinySpec, write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), TinySpec(**TINY_DIMS))


@pytest.fixture(scope="session")
def mistral_instruct():
    """mistral-common's own v1 instruct tokenizer: the oracle for the Mixtral format."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from finetune.model.tiny import mistral_v1_tokenizer_file

    return MistralTokenizer.from_file(str(mistral_v1_tokenizer_file())).instruct_tokenizer


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) -> path"""

    def write(path: Path, rows) -> Path:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_recipe():
    """write_recipe(path, model_dir, data_section) -> path: a minimal recipe for the commands that take --recipe."""
    import yaml

    def write(path: Path, model_dir: Path, data: dict) -> Path:
        recipe = {"model": {"path": str(model_dir)}, "data": data, "output_dir": str(path.parent / "out")}
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
        return path

    return write
