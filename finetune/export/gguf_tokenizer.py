"""Mixtral's SentencePiece tokenizer as llama.cpp reads it (`tokenizer.ggml.*`), and the Ollama Modelfile.

The vocabulary follows the rules of llama.cpp's converter for a `tokenizer.model` folder: every piece with its
score and type, ids from added_tokens.json and tokenizer_config.json's added_tokens_decoder laid over them, padded to
the model's vocab_size. Special ids, add_bos/add_eos and the chat template come from gguf's own `SpecialVocab`.
A folder without a chat template gets Mixtral-8x7B-Instruct's, so `llama-cli --jinja` and Ollama format prompts the
way the model was tuned.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from finetune.errors import UserError

T = gguf.TokenType
# Mixtral-8x7B-Instruct-v0.1's template: [INST] user [/INST] answer</s>, BOS once at the start
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Ollama's Go template for the same format; the system prompt (if any) leads the first user turn
OLLAMA_TEMPLATE = "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]"
STOP_TOKENS = ("[INST]", "[/INST]", "</s>")


def tokenizer_folder(*folders: Path | None) -> Path:
    """The first folder holding a SentencePiece tokenizer.model: the adapter's (the one training used), then the base's."""
    for folder in folders:
        if folder is not None and (folder / "tokenizer.model").is_file():
            return folder
    where = ", ".join(str(f) for f in folders if f is not None)
    raise UserError(f"no tokenizer.model in {where}; export-gguf writes Mixtral's SentencePiece vocabulary from it")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def sentencepiece_vocab(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and token types for ids 0..vocab_size-1."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [int(T.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), int(kind)
    for text, i in _read_json(folder / "added_tokens.json").items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, int(T.USER_DEFINED)
    for key, entry in (_read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        i, text = int(key), entry["content"]
        if i >= vocab_size:
            continue
        if entry.get("special") or _looks_special(text):
            types[i] = int(T.CONTROL)
        else:
            text, types[i] = text.replace("\u2581", " "), int(T.USER_DEFINED)
        tokens[i], scores[i] = text.encode(), -1000.0
    return tokens, scores, types


def _looks_special(text: str) -> bool:
    """The converter's guess for added tokens that ought to be control tokens but are not marked special."""
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or any(
        text.startswith(a) and text.endswith(b) for a, b in (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))
    )


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> bool:
    """Write the vocabulary and special tokens; returns whether Mixtral's chat template was added as the default."""
    tokens, scores, types = sentencepiece_vocab(folder, vocab_size)
    prefix_space = _read_json(folder / "tokenizer_config.json").get("add_prefix_space")
    if prefix_space is not None:
        writer.add_add_space_prefix(prefix_space)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        writer.add_chat_template(MIXTRAL_CHAT_TEMPLATE)
        return True
    return False


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the file beside it: `ollama create NAME -f THIS` in one step."""
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in STOP_TOKENS)
    return f'FROM ./{gguf_name}\nTEMPLATE """{OLLAMA_TEMPLATE}"""\n{stops}'
