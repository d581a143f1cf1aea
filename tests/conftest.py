"""Shared fixtures: tiny Mixtral models are built here, offline, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.tiny import TinySpec, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Mixtral (8 experts, top-2) with the real Mixtral v1 tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), TinySpec())


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in models and dataset caches go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
