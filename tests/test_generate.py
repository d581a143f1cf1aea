"""`finetune generate` / `finetune chat`: mistral-common prompt ids, base + adapter == merged, piped chat, bad input."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
import yaml
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.generate import Generator, Sampling, chat_loop, load_generator, prompt_ids, reply, resolve_source
from finetune.model.load import load_tokenizer
from finetune.model.tiny import TinySpec, write_tiny_model
from finetune.moe import apply_lora, load_mixtral, save_adapter

runner = CliRunner()
GREEDY = Sampling(max_new_tokens=8, temperature=0.0)


def make_adapter(model_dir, output, randomize, seed: int = 0):
    base, _ = load_mixtral(model_dir, quantization="none", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4, train_router=True)  # fmt: skip
    randomize(model, seed)
    save_adapter(model, output)
    return output


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, randomize_lora):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", randomize_lora)


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir, adapter_dir, tmp_path_factory):
    """`finetune merge` of the adapter onto the 16-bit base (verified by logits as it writes)."""
    from finetune.export.merge_run import merge

    out = tmp_path_factory.mktemp("merged") / "model"
    merge(adapter_dir, out, base=str(tiny_model_dir), dtype="float32", echo=lambda _line: None)
    return out


@pytest.fixture(scope="module")
def with_adapter(tiny_model_dir, adapter_dir) -> Generator:
    return load_generator(resolve_source(str(tiny_model_dir), adapter_dir, "none"), dtype="float32", device="cpu")


def test_prompt_ids_are_mistral_commons_encode_instruct(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    assert (source.chat_format, source.quantization, source.adapter_dir) == ("mistral", "none", None)
    gen = Generator(None, load_tokenizer(tiny_model_dir), source, torch.device("cpu"))
    instruct = MistralTokenizer.from_file(str(tiny_model_dir / "tokenizer.model")).instruct_tokenizer
    prompt = "Name three [INST] colours </s> please."
    expected = instruct.encode_instruct(InstructRequest(messages=[UserMessage(content=prompt)])).tokens
    assert prompt_ids(gen, [{"role": "user", "content": prompt}]) == expected

    source.system_prompt = "Be brief."
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]
    request = InstructRequest(
        messages=[UserMessage(content=c) if r == "user" else AssistantMessage(content=c) for r, c in turns],
        system_prompt="Be brief.",
    )
    ids = prompt_ids(gen, [{"role": r, "content": c} for r, c in turns])
    assert ids == instruct.encode_instruct(request).tokens


def test_greedy_base_plus_adapter_equals_merged(with_adapter, merged_dir):
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    merged = load_generator(resolve_source(str(merged_dir)), dtype="float32", device="cpu")
    assert merged.source.quantization == "none" and merged.source.adapter_dir is None

    ids = torch.tensor([prompt_ids(with_adapter, messages)])
    with torch.no_grad():
        adapted = with_adapter.model(ids).logits[0, -1]
        with with_adapter.model.disable_adapter():
            plain = with_adapter.model(ids).logits[0, -1]
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model, so agreement means something

    text, tokens = reply(with_adapter, messages, GREEDY)
    merged_text, merged_tokens = reply(merged, messages, GREEDY)
    assert len(tokens) == GREEDY.max_new_tokens and tokens == merged_tokens and text == merged_text


def test_chat_keeps_the_conversation_and_reset_clears_it(with_adapter):
    out, err = io.StringIO(), io.StringIO()
    lines = io.StringIO("Hello\n\nAnd then?\n/reset\nHello\n/exit\nnever read\n")
    replies = chat_loop(with_adapter, GREEDY, lines, out, err)
    assert len(replies) == 3 and "cleared" in err.getvalue()
    assert replies[2] == replies[0]  # after /reset the same prompt meets an empty history
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "And then?"},
    ]
    assert replies[1] == reply(with_adapter, history, GREEDY)[0]
    assert replies[1] != reply(with_adapter, history[2:], GREEDY)[0]  # the history changed the answer
    assert all(r in out.getvalue() for r in replies)


def test_cli_generate_from_a_run_folder_streams_the_nf4_reply(tiny_model_dir, adapter_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    recipe = {"model": {"path": str(tiny_model_dir), "quantization": "nf4"}, "data": {"chat_format": "mistral"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    source = resolve_source(str(run))
    assert (source.quantization, source.adapter_dir) == ("nf4", run / "adapter")
    short = Sampling(max_new_tokens=4, temperature=0.0)  # 4-bit generation on CPU is slow; a few tokens suffice
    expected = reply(load_generator(source, device="cpu"), [{"role": "user", "content": "Hi there"}], short)[0]

    args = ["generate", "--model", str(run), "--prompt", "Hi there", "--max-new-tokens", "4", "--temperature", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected and expected

    result = runner.invoke(app, ["generate", "--model", str(run), "--adapter", str(adapter_dir), "--prompt", "x"])
    assert result.exit_code == 2 and "drop --adapter" in result.stderr


def test_cli_chat_reads_piped_stdin(tiny_model_dir, adapter_dir, with_adapter):
    args = ["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--quantization", "none"]
    result = runner.invoke(app, [*args, "--temperature", "0", "--max-new-tokens", "8"], input="Hello\nMore?\n")
    assert result.exit_code == 0, result.output
    first = reply(with_adapter, [{"role": "user", "content": "Hello"}], GREEDY)[0]
    assert result.stdout.startswith(first) and len(result.stdout) > len(first) + 1


def test_builtin_tiny_model_name_resolves():
    source = resolve_source("tiny-random-mixtral")
    assert (source.model_dir / "config.json").is_file() and source.chat_format == "mistral"


def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, randomize_lora):
    not_adapter = tmp_path / "not-an-adapter"
    not_adapter.mkdir()
    other = write_tiny_model(tmp_path / "other", TinySpec(hidden_size=32, intermediate_size=64, experts=4))
    other_adapter = make_adapter(other, tmp_path / "other-adapter", randomize_lora)
    model = ["--model", str(tiny_model_dir)]
    cases = [
        (["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"], "does not exist"),
        (["chat", "--model", str(tmp_path / "missing")], "does not exist"),
        (["generate", *model, "--adapter", str(not_adapter), "--prompt", "hi"], "is not a PEFT adapter folder"),
        (["generate", *model, "--adapter", str(other_adapter), "--prompt", "hi"], "model of another shape"),
        (["generate", "--model", str(not_adapter), "--prompt", "hi"], "has no config.json"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
