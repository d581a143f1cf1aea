"""What `finetune plan` prints, piped as CI sees it: the GPU it assumed, times in s/min/h with a total, no network
reach for a hub id (the local cache only, then an error naming the shipped config), no throughput invented for a
card known by its memory alone, and no message cut mid-word."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.plan.timing import duration_text, one_line

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL_CONFIG = ROOT / "bench" / "configs" / "mixtral-8x7b"
REAL_RECIPE = ROOT / "recipes" / "mixtral-8x7b-qlora-sft.yaml"
TINY_RECIPE = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
HUB_ID = "mistralai/Mixtral-8x7B-Instruct-v0.1"  # the real recipe's model


def plan(*args):
    return CliRunner().invoke(app, ["plan", *map(str, args)])


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No hub cache entries and HF_HUB_OFFLINE unset; any socket connection fails the test."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    attempts = []

    def refuse(*args, **kwargs):  # a name lookup or a connection: the first steps of any network use
        attempts.append(args)
        raise OSError("network attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache, attempts


def test_tiny_plan_says_which_gpu_it_assumed_and_times_in_seconds(tiny_model_dir):
    result = plan(TINY_RECIPE, "--set", f"model.path={tiny_model_dir}")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "GPU: assumed H100 80GB SXM (none given)" in out and "--gpu NAME" in out
    assert "0.0 h" not in out and "0.0 GFLOP" not in out
    assert "60 steps of up to 1,024 tokens: under a second" in out
    assert "bound by per-step overheads" in out  # the FLOP model does not hold for a tiny model, and it says so
    named = plan(TINY_RECIPE, "--set", f"model.path={tiny_model_dir}", "--gpu", "H100").stdout
    assert "GPU: assumed" not in named


def test_hub_id_uses_the_local_cache_only_and_names_the_shipped_config(empty_hub_cache):
    _, attempts = empty_hub_cache
    result = plan(REAL_RECIPE)
    assert result.exit_code == 2
    assert attempts == [] and "Retrying" not in result.output and "Traceback" not in result.output
    assert "--set model.path=bench/configs/mixtral-8x7b" in result.stderr
    assert f"hf download {HUB_ID} config.json" in result.stderr


def test_hub_id_in_the_local_cache_is_planned_offline(empty_hub_cache):
    cache, attempts = empty_hub_cache
    repo = cache / "models--mistralai--Mixtral-8x7B-Instruct-v0.1"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(MIXTRAL_CONFIG / "config.json", repo / "snapshots" / ("0" * 40) / "config.json")
    result = plan(REAL_RECIPE, "--gpu", "H100")
    assert result.exit_code == 0, result.output
    assert attempts == [] and "verdict: fits" in result.stdout


def test_shipped_config_gives_a_total_time_with_hub_data_counted_at_max_length():
    result = plan(REAL_RECIPE, "--set", f"model.path={MIXTRAL_CONFIG}", "--gpu", "H100")
    assert result.exit_code == 0, result.output
    out = result.stdout
    # 20,000 samples less the 2% eval hold-out, packed into 4096-token rows, 16 rows per step
    assert "1,225 steps of up to 65,536 tokens: at most " in out and " h\n" in out
    assert "data not read" not in out and "each record counted at max_length 4096" in out


def test_shipped_config_reads_local_data_with_mistral_commons_tokenizer(tmp_path):
    result = plan(REAL_RECIPE, "--set", f"model.path={MIXTRAL_CONFIG}", "--set", "data.train=[{path: builtin:tiny-chat}]",
                  "--gpu", "H100")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "tokenizer: Mixtral v1 from mistral-common" in out and "data not read" not in out
    assert "1 step of up to 65,536 tokens: about " in out and "Tokenising" not in result.output


def test_a_folder_without_a_usable_tokenizer_says_why_in_whole_words(tmp_path):
    config = json.loads((MIXTRAL_CONFIG / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 32768}))
    result = plan(REAL_RECIPE, "--set", f"model.path={tmp_path}", "--set", "data.train=[{path: builtin:tiny-chat}]",
                  "--gpu", "H100")  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("tokens:"))
    assert line.endswith("has no tokenizer files and its vocabulary is not Mixtral's v1")
    assert "total time unknown" in result.stdout and "training.max_steps" in result.stdout


def test_memory_alone_gives_no_throughput():
    result = plan(REAL_RECIPE, "--set", f"model.path={MIXTRAL_CONFIG}", "--gpu-memory", "48GB")
    assert result.exit_code == 0, result.output
    time_line = next(x for x in result.stdout.splitlines() if x.startswith("time:"))
    assert "tokens/s" not in time_line and "throughput unknown" in time_line and "--gpu NAME" in time_line
    assert "a 48 GiB GPU" in result.stdout and "H100" not in result.stdout
    as_json = plan(REAL_RECIPE, "--set", f"model.path={MIXTRAL_CONFIG}", "--gpu-memory", "48GB", "--json").stdout
    t = json.loads(as_json[as_json.index("{") :])["time"]
    assert t["tokens_per_second"] is None and "seconds" not in t
    named = plan(REAL_RECIPE, "--set", f"model.path={MIXTRAL_CONFIG}", "--gpu", "L40S", "--gpu-memory", "40GB").stdout
    assert "tokens/s on L40S" in named and "40.00 GiB per GPU" in named


DURATIONS = [(0.003, "under a second"), (42.4, "42 s"), (450, "7.5 min"), (3000, "50 min"), (11520, "3.2 h")]


@pytest.mark.parametrize(("seconds", "text"), [*DURATIONS, (200_000, "55.6 h (2.3 days)")])
def test_duration_reads_in_the_unit_that_fits(seconds, text):
    assert duration_text(seconds) == text


def test_long_errors_are_shortened_between_words():
    from finetune.errors import UserError

    text = one_line(UserError("Couldn't instantiate the backend tokenizer from one of: " + "word " * 80), width=60)
    assert text.endswith(" ...") and len(text) <= 60
    assert all(w in ("word", "...") or w in "Couldn't instantiate the backend tokenizer from one of:" for w in
               text.split())  # fmt: skip
