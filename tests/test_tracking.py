"""Tracking units: secrets never written, modes resolved without prompting, a failing sink never fatal."""

from __future__ import annotations

import importlib.util
import json

import pytest

from finetune.errors import UserError
from finetune.recipe.schema import load_recipe
from finetune.recipe.secrets import scrub_secrets, scrub_yaml
from finetune.tracking import sinks as tracking
from finetune.tracking.sinks import JsonlSink, Tracker, resolve_mode

TINY = "recipes/tiny-mixtral-sft.yaml"


def test_scrub_secrets_replaces_secret_keys_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    data = {
        "training": {"extra": {"hub_token": "hf_zzzzzzzzzzzz", "max_new_tokens": 12}},
        "tracking": {"api_key": "k" * 40, "project": "p", "sample_max_new_tokens": 32},
        "data": {"train": [{"path": "https://user:hf_abcdefghijklmnop@example.org/x.jsonl"}], "pad_token": "<unk>"},
    }
    clean = scrub_secrets(data)
    assert clean["training"]["extra"] == {"hub_token": "***", "max_new_tokens": 12}
    assert clean["tracking"] == {"api_key": "***", "project": "p", "sample_max_new_tokens": 32}
    assert clean["data"]["train"][0]["path"] == "https://user:***@example.org/x.jsonl"
    assert clean["data"]["pad_token"] == "<unk>"
    assert data["tracking"]["api_key"] == "k" * 40  # the input is not modified
    assert "hf_zzzz" not in scrub_yaml("training:\n  extra:\n    hub_token: hf_zzzzzzzzzzzz\n")


def test_auto_mode_is_online_only_when_logged_in(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert resolve_mode("auto") == "online"
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"


def test_a_failing_sink_warns_once_and_the_rest_carry_on(tmp_path, capsys):
    class Broken:
        def log(self, metrics, step):
            raise OSError("No space left on device")

        def close(self):
            pass

    jsonl = JsonlSink(tmp_path / "metrics.jsonl")
    tracker = Tracker([Broken(), jsonl])
    for step in range(3):
        tracker.log({"loss": 1.0 / (step + 1), "moe/load": [[0.5, 0.5]], "bad": float("nan")}, step)
    tracker.log_samples([{"step": 2, "prompt": "p", "reference": "r", "generated": "g"}], 2)
    tracker.close()
    assert capsys.readouterr().out.count("warning: tracking to Broken failed") == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["moe/load"] == [[0.5, 0.5]] and "bad" not in rows[0]
    assert json.loads((tmp_path / "samples.jsonl").read_text())["generated"] == "g"


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_backend_whose_package_is_missing_is_a_recipe_error_naming_it(monkeypatch, backend):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == backend else real(n, *a))
    with pytest.raises(UserError) as error:
        load_recipe(TINY, [f"tracking.backend={backend}"])
    assert f"tracking.backend: backend {backend} needs the {backend} package; pip install {backend}" in str(error.value)


def test_tensorboard_sink_writes_the_same_scalars(monkeypatch, tmp_path):
    """Through a stand-in SummaryWriter (tensorboard is optional): every scalar, the heatmap, the samples."""
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))

    import torch.utils

    fake = type("module", (), {"SummaryWriter": Writer})
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", fake)
    sink = tracking.TensorBoardSink(tmp_path, {"model": {"path": "x"}})
    sink.log({"loss": 2.0, "moe_imbalance/layer0": 1.5, "moe/load": [[0.25, 0.75], [0.5, 0.5]]}, 3)
    sink.log_samples([{"prompt": "p", "generated": "g"}], 3)
    assert ("add_scalar", "loss", 2.0, 3) in calls and ("add_scalar", "moe_imbalance/layer0", 1.5, 3) in calls
    assert any(c[0] == "add_figure" and c[1] == "moe_load/heatmap" for c in calls)
    assert calls[0] == ("init", str(tmp_path / "tensorboard")) and torch.utils is not None
