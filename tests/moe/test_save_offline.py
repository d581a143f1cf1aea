"""A checkpoint save never reaches for the network, for the built-in model's portable name or a hub id.

PEFT's `save_pretrained` with its default `save_embedding_layers="auto"` (the Trainer's checkpoint call) looks
`base_model_name_or_path` up on the hub to see whether the vocabulary changed: a DNS lookup per save, and warnings
("Unable to fetch remote file", "Could not find a config file in tiny-random-mixtral").
"""

from __future__ import annotations

import logging
import socket
import warnings

import pytest
import torch

from finetune.moe import apply_lora, load_mixtral
from finetune.tracking.adapter_card import BaseReference, set_base_reference


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a connection is recorded and refused."""
    attempts: list[str] = []

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host}")
        raise socket.gaierror(socket.EAI_NONAME, "network access refused by the test")

    def refuse_connect(self, address):
        attempts.append(f"connect {address}")
        raise OSError("network access refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # as a user's shell has it: the lookup would go out
    return attempts


@pytest.mark.parametrize("base_name", ["tiny-random-mixtral", "mistralai/Mixtral-8x7B-v0.1"])
def test_checkpoint_save_tries_no_network_and_prints_nothing(tiny_dir, tmp_path, no_network, caplog, capfd, base_name):
    base, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["down_proj"], expert_r=2, expert_alpha=4)  # fmt: skip
    set_base_reference(model, BaseReference(base_name, None, "builtin" if "/" not in base_name else "hub"))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        for step in (1, 2):  # as transformers' Trainer._save writes each checkpoint
            model.save_pretrained(str(tmp_path / f"checkpoint-{step}"), state_dict=None, is_main_process=True)
    printed = capfd.readouterr()
    assert no_network == []
    assert [str(w.message) for w in caught] == []
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert base_name not in printed.out + printed.err, printed
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
