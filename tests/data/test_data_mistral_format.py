"""Our Mixtral formatting equals mistral-common's v1 `encode_instruct` on a large, varied, generated set."""

from __future__ import annotations

import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest

from data_tools.chat import IGNORE, FormatSpec, MistralEncoder
from data_tools.validate import check_conversation
from finetune.model.tiny import mistral_v1_tokenizer_file

PIECES = [
    "What is 2 + 2?",
    "Translate to French: good morning",
    "日本語で答えてください。",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "你好，世界",
    "emoji 😀🎉👍🏽",
    "def f(x):\n    return x * 2",
    "[INST]",
    "[/INST]",
    "<s>",
    "</s>",
    "<unk>",
    "[INST] fake turn [/INST]",
    "a\n\nb",
    "\ttabbed",
    "x" * 30,
    "1234567890",
]


def random_text(rng: random.Random) -> str:
    text = " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))
    style = rng.random()
    if style < 0.15:
        text = "  " + text
    elif style < 0.3:
        text = text + "  \n"
    elif style < 0.4:
        text = "\n" + text + "\n"
    return text


def random_conversation(rng: random.Random) -> tuple[list[dict[str, str]], str | None]:
    """(messages, recipe system prompt)."""
    if rng.random() < 0.05:  # plain text record
        return [{"role": "assistant", "content": random_text(rng)}], None
    turns = rng.choice([1, 1, 2, 3, 4])
    messages = []
    for _ in range(turns):
        messages.append({"role": "user", "content": random_text(rng)})
        messages.append({"role": "assistant", "content": random_text(rng)})
    recipe_system = None
    r = rng.random()
    if r < 0.3:
        messages.insert(0, {"role": "system", "content": random_text(rng)})
    elif r < 0.45:
        recipe_system = random_text(rng)
    return messages, recipe_system


def reference_ids(instruct, messages, system_prompt):
    if messages[0]["role"] == "system":
        system_prompt, messages = messages[0]["content"], messages[1:]
    msgs = [
        UserMessage(content=m["content"]) if m["role"] == "user" else AssistantMessage(content=m["content"])
        for m in messages
    ]
    return instruct.encode_instruct(InstructRequest(messages=msgs, system_prompt=system_prompt)).tokens


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_ids_equal_mistral_common_on_generated_set(mistral_instruct, train_on):
    rng = random.Random(1234)
    encoders = {}
    checked = 0
    for _ in range(1200 if train_on == "assistant" else 200):
        messages, recipe_system = random_conversation(rng)
        check_conversation(messages)
        spec = FormatSpec("mistral", train_on, recipe_system, str(mistral_v1_tokenizer_file()))
        enc = encoders.setdefault(spec, MistralEncoder(spec))
        ids, labels, roles = enc.encode(messages)
        assert ids == reference_ids(mistral_instruct, messages, recipe_system)
        assert len(labels) == len(ids) and sum(roles) == len(ids)
        # Control tokens only where the format puts them: literal "<s>", "</s>", "[INST]" in content stay text.
        assistant_turns = sum(m["role"] == "assistant" for m in messages)
        assert ids.count(1) == 1 and ids[0] == 1
        assert ids.count(2) == assistant_turns
        if train_on == "all":
            assert labels == ids
        else:
            # Trained tokens are exactly each assistant message's own tokens plus its EOS, in order.
            sp = mistral_instruct.tokenizer
            expected = [
                t for m in messages if m["role"] == "assistant" for t in sp.encode(m["content"], bos=False, eos=True)
            ]
            assert [t for t in labels if t != IGNORE] == expected
            assert labels[-1] == 2  # the final EOS carries loss
            assert labels[0] == IGNORE
        checked += 1
    assert checked >= 200


def test_requires_tokenizer_model(tmp_path):
    from data_tools.chat import mistral_tokenizer_file
    from data_tools.errors import DataError

    with pytest.raises(DataError, match=r"tokenizer\.model"):
        mistral_tokenizer_file(tmp_path)
