"""Loss masks from message boundaries: assistant tokens + their end-of-turn carry loss, prompts never do."""

from __future__ import annotations

import pytest

from data_tools.chat import IGNORE, FormatSpec, TemplateEncoder, resolve_template
from data_tools.errors import DataError
from data_tools.pipeline import check_pad_token

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <s> [INST] there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# A Llama-2/Mistral style Jinja template that ends each assistant turn with EOS (tokenizer-template path).
JINJA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'BOT: ' + m['content'] + eos_token + '\\n' }}"
    "{% else %}{{ 'SYS: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'BOT: ' }}{% endif %}"
)


def trained_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_chatml_masks(tokenizer):
    spec = FormatSpec("chatml", "assistant", None, template=resolve_template("chatml", None, tokenizer))
    ids, labels, roles = TemplateEncoder(spec, tokenizer).encode(CONV)
    assert trained_text(tokenizer, ids, labels) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert roles[0] > 0 and roles[1] > 0 and roles[2] == sum(lab != IGNORE for lab in labels)
    full = tokenizer.decode(ids)
    assert full.startswith("<s><|im_start|>system\nBe brief.<|im_end|>")
    enc = TemplateEncoder(spec, tokenizer)
    for n in range(1, len(CONV) + 1):  # our fast render path gives exactly apply_chat_template's text
        for gen in (False, True):
            ref = tokenizer.apply_chat_template(
                CONV[:n], chat_template=spec.template, tokenize=False, add_generation_prompt=gen
            )
            assert enc.render([CONV[:n]], gen) == [ref]
    assert (
        ids
        == tokenizer(
            tokenizer.apply_chat_template(CONV, chat_template=spec.template, tokenize=False), add_special_tokens=False
        )["input_ids"]
    )
    everything = TemplateEncoder(FormatSpec("chatml", "all", None, template=spec.template), tokenizer).encode(CONV)
    assert everything[1] == everything[0] == ids


def test_template_from_recipe_and_from_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(JINJA)
    assert resolve_template("template", str(path), tokenizer) == JINJA
    spec = FormatSpec("template", "assistant", "Default system.", template=JINJA)
    ids, labels, _ = TemplateEncoder(spec, tokenizer).encode(CONV[1:])  # recipe system prompt gets inserted
    assert tokenizer.decode(ids).startswith("<s>SYS: Default system.\nUSER: Hi")
    assert trained_text(tokenizer, ids, labels) == "Hello!</s>\n4</s>\n"
    eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    assert eos_positions and all(labels[i] == tokenizer.eos_token_id for i in eos_positions)  # each EOS trained
    # chat_format: template without chat_template uses the tokenizer's own template
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = JINJA
    assert resolve_template("template", None, tok) == JINJA
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        resolve_template("template", None, tok)


def test_pad_equal_to_eos_is_refused(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    with pytest.raises(DataError, match="pad token equals its EOS"):
        check_pad_token(tok)
    check_pad_token(tokenizer)  # <unk> is fine
