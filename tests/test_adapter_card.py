"""The adapter names its base portably; the built-in tiny base is recreated identically anywhere.

The card and base_model_name_or_path of a real run are checked in test_e2e_run.py, on its shared run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune.model.tiny import TINY_MODEL_NAME, materialize_builtin
from finetune.tracking.adapter_card import base_reference


def test_base_reference_names_what_the_user_gave(tmp_path):
    local = tmp_path / "my-mixtral"
    local.mkdir()
    assert base_reference(str(local), local).name_or_path == str(local)
    builtin = base_reference(TINY_MODEL_NAME, tmp_path / "cache" / TINY_MODEL_NAME)
    assert (builtin.name_or_path, builtin.kind) == (TINY_MODEL_NAME, "builtin")
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abcd"
    hub = base_reference("org/name", snapshot)
    assert (hub.name_or_path, hub.revision, hub.kind) == ("org/name", "0123abcd", "hub")
    assert base_reference("org/name", tmp_path / "elsewhere", "v1.0").revision == "v1.0"


def test_builtin_base_is_recreated_identically_by_the_card_command(tmp_path):
    """The card tells users of a tiny-model adapter to run `finetune tiny-model -o tiny-random-mixtral`."""
    cached = materialize_builtin()
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "tiny-model", "-o", str(tmp_path / TINY_MODEL_NAME)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours = load_file(str(tmp_path / TINY_MODEL_NAME / "model.safetensors"))
    builtin = load_file(str(Path(cached) / "model.safetensors"))
    assert ours.keys() == builtin.keys()
    assert all(torch.equal(ours[k], builtin[k]) for k in ours)
