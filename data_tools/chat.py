"""Chat formatting and loss masks, built from message boundaries (never by searching for the response text).

- `mistral`: mistral-common's own instruct tokenizer is the formatter. We walk the messages exactly as its
  `encode_instruct` does, calling its per-message encoders, so the ids are identical and each message's token span is
  known (trl #980: `[/INST]` tokenises differently in context, so string search breaks).
- `chatml` / `template`: the HF tokenizer renders a Jinja template; each assistant turn's character span comes from
  rendering prefixes of the conversation, and tokens are assigned to spans through the fast tokenizer's offsets.

Labels are aligned with input_ids as in transformers (the model shifts them); -100 means "no loss".

Known limit of the template formats: like `apply_chat_template` itself, the HF tokenizer parses special-token strings
(e.g. a literal "<s>") inside message content as control tokens. The mistral format never does: mistral-common
encodes content with SentencePiece, where "<s>", "[INST]" etc. stay text (tested on a generated set).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.errors import DataError

IGNORE = -100
ROLE_SLOTS = ("system", "user", "assistant", "other")  # order of `role_tokens`; other = BOS and format tokens
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FormatSpec:
    """Everything that decides the token ids and labels (hashable: it is part of the cache key)."""

    chat_format: str  # mistral | chatml | template
    train_on: str  # assistant | all
    system_prompt: str | None
    mistral_file: str | None = None  # tokenizer.model for chat_format=mistral
    template: str | None = None  # Jinja text for chatml/template


def mistral_tokenizer_file(model_dir: Path | None) -> Path:
    """The model's SentencePiece/tekken file for mistral-common, or a clear error."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        candidates = [*sorted(model_dir.glob("tokenizer.model.v*")), model_dir / "tokenizer.model"]
        candidates += sorted(model_dir.glob("tekken*.json"))
        for c in candidates:
            if c.is_file():
                return c
    raise DataError(
        f"chat_format: mistral needs the model's mistral tokenizer file (tokenizer.model) in {model_dir}; "
        "it is missing, so use chat_format: template (the tokenizer's chat template) or chatml"
    )


def resolve_template(chat_format: str, chat_template: str | None, tokenizer) -> str | None:
    """Jinja text for chatml/template formats: the recipe's text or file, else the tokenizer's own template."""
    if chat_format == "chatml":
        return CHATML_TEMPLATE
    if chat_format != "template":
        return None
    if chat_template:
        p = Path(chat_template).expanduser()
        if "{" not in chat_template and p.is_file():
            return p.read_text(encoding="utf-8")
        if "{" not in chat_template:
            raise DataError(f"data.chat_template: file not found: {chat_template}")
        return chat_template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise DataError("chat_format: template but neither data.chat_template nor the tokenizer has a chat template")


@functools.lru_cache(maxsize=4)
def mistral_instruct_tokenizer(path: str):
    """mistral-common's instruct tokenizer for a tokenizer file, loaded once per process."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(path).instruct_tokenizer


class MistralEncoder:
    """mistral-common formatting with per-message spans."""

    def __init__(self, spec: FormatSpec):
        self.spec = spec
        self.instruct = mistral_instruct_tokenizer(spec.mistral_file)

    def request(self, messages: list[dict[str, str]]):
        """The `InstructRequest` mistral-common would get: a leading system message becomes the system prompt."""
        from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
        from mistral_common.protocol.instruct.request import InstructRequest

        system = self.spec.system_prompt
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        msgs = [
            UserMessage(content=m["content"]) if m["role"] == "user" else AssistantMessage(content=m["content"])
            for m in messages
        ]
        return InstructRequest(messages=msgs, system_prompt=system)

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], list[int]]:
        from mistral_common.protocol.instruct.messages import UserMessage

        request = self.request(messages)
        ins = self.instruct
        first_user, last_user = ins.find_first_last_user(request)
        ids = list(ins.start())
        labels = list(ids) if self.spec.train_on == "all" else [IGNORE] * len(ids)
        roles = [0, 0, 0, len(ids)]
        for idx, msg in enumerate(request.messages):
            if isinstance(msg, UserMessage):
                tokens, _, _ = ins.encode_user_message(
                    msg,
                    request.available_tools,
                    idx == last_user,
                    idx == first_user,
                    system_prompt=request.system_prompt,
                    force_img_first=True,
                    settings=request.settings,
                )
                trained, slot = self.spec.train_on == "all", 1
                if request.system_prompt and idx in (first_user, last_user):
                    roles[0] += self._system_tokens(msg, request, idx, first_user, last_user, len(tokens))
            else:
                tokens = ins.encode_assistant_message(msg, is_before_last_user_message=idx < last_user)
                trained, slot = True, 2
            ids.extend(tokens)
            labels.extend(tokens if trained else [IGNORE] * len(tokens))
            roles[slot] += len(tokens)
        roles[1] -= roles[0]  # the system prompt travels inside a user message; count it once, as system
        return ids, labels, roles

    def _system_tokens(self, msg, request, idx: int, first_user: int, last_user: int, n_with: int) -> int:
        """Tokens the system prompt adds to the user message that carries it (the v1 format joins them)."""
        without, _, _ = self.instruct.encode_user_message(
            msg,
            request.available_tools,
            idx == last_user,
            idx == first_user,
            system_prompt=None,
            force_img_first=True,
            settings=request.settings,
        )
        return n_with - len(without)


class TemplateEncoder:
    """A Jinja chat template through the HF tokenizer; assistant spans from prefix renders (batched)."""

    def __init__(self, spec: FormatSpec, tokenizer):
        self.spec = spec
        self.tok = tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("chat_format chatml/template needs a fast tokenizer (for character offsets)")
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(spec.template)
        except ImportError:  # other transformers versions: the public (slower) path
            self._compiled = None
        self._template_kwargs = {"tools": None, "documents": None, **tokenizer.special_tokens_map}

    def render(self, conversations: list[list[dict[str, str]]], add_generation_prompt: bool) -> list[str]:
        """The template's text for each conversation. Renders through transformers' compiled template (the one
        `apply_chat_template` uses) without its per-call normalisation, which dominates on short messages; the
        result is the same text (checked in tests/data/test_data_masks.py)."""
        if not conversations:
            return []
        if self._compiled is None:
            return self.tok.apply_chat_template(
                conversations,
                chat_template=self.spec.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        kw = self._template_kwargs
        return [
            self._compiled.render(messages=c, add_generation_prompt=add_generation_prompt, **kw) for c in conversations
        ]

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], list[int]]:
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], list[int], list[int]]]:
        """Render every conversation and its prefixes in two template calls, tokenise all texts in one batch."""
        convs = [self._with_system(m) for m in conversations]
        plain = [_is_plain_text(m) for m in convs]
        prefix_requests, head_requests = [], []  # messages[: i + 1] for every i; messages[:i] for assistant turns
        for m, is_plain in zip(convs, plain, strict=True):
            if not is_plain:
                prefix_requests += [m[: i + 1] for i in range(len(m))]
                head_requests += [m[:i] for i, x in enumerate(m) if x["role"] == "assistant"]
        prefixes = iter(self.render(prefix_requests, False))
        heads = iter(self.render(head_requests, True))
        texts, all_spans = [], []
        for m, is_plain in zip(convs, plain, strict=True):
            if is_plain:  # plain text: BOS text EOS, all of it trained
                bos, eos = self.tok.bos_token or "", self.tok.eos_token or ""
                body = next(x for x in m if x["role"] == "assistant")["content"]
                text = bos + body + eos
                texts.append(text)
                all_spans.append([(0, len(bos), 3), (len(bos), len(text), 2)])
                continue
            ends = [next(prefixes) for _ in m]
            text = ends[-1]
            spans, prev = [], 0
            for i, x in enumerate(m):
                if x["role"] == "assistant":  # the generation prompt (e.g. "<|im_start|>assistant\n") is prompt
                    head = _prefix_len(text, next(heads))
                    spans.append((prev, head, 3))
                    prev = head
                upto = _prefix_len(text, ends[i])
                spans.append((prev, upto, ROLE_SLOTS.index(x["role"])))
                prev = upto
            spans.append((prev, len(text), 3))
            texts.append(text)
            all_spans.append([sp for sp in spans if sp[1] > sp[0]])
        encodings = self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._labels(e.ids, e.offsets, spans) for e, spans in zip(encodings, all_spans, strict=True)]

    def _with_system(self, messages):
        if self.spec.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.spec.system_prompt}, *messages]
        return messages

    def _labels(self, ids, offsets, spans) -> tuple[list[int], list[int], list[int]]:
        """Each token belongs to the span of its last character ("▁Hello" right after a generation prompt that
        ends in a space starts in the prompt but is the reply's first token)."""
        if not ids:
            return [], [], [0, 0, 0, 0]
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        last = np.maximum(off[:, 0], off[:, 1] - 1)
        ends = np.array([sp[1] for sp in spans], dtype=np.int64)
        slots = np.array([sp[2] for sp in spans], dtype=np.int64)[
            np.minimum(np.searchsorted(ends, last, side="right"), len(spans) - 1)
        ]
        ids_arr = np.asarray(ids, dtype=np.int64)
        trained = np.ones_like(slots, dtype=bool) if self.spec.train_on == "all" else slots == 2
        labels = np.where(trained, ids_arr, IGNORE)
        return list(ids), labels.tolist(), np.bincount(slots, minlength=4).tolist()


def _is_plain_text(messages: list[dict[str, str]]) -> bool:
    body = [m for m in messages if m["role"] != "system"]
    return len(body) == 1 and body[0]["role"] == "assistant"


def _prefix_len(text: str, prefix: str) -> int:
    if not text.startswith(prefix):
        raise DataError(
            "the chat template is not prefix-stable (a later message changes earlier text), so loss masks "
            "cannot be derived from message boundaries; use chat_format: chatml or mistral"
        )
    return len(prefix)


_ENCODERS: dict[Any, Any] = {}


def get_encoder(spec: FormatSpec, tokenizer=None):
    """One encoder per process and spec (mistral-common loads its model once per worker)."""
    key = (spec, id(tokenizer) if spec.chat_format != "mistral" else None)
    if key not in _ENCODERS:
        _ENCODERS[key] = MistralEncoder(spec) if spec.chat_format == "mistral" else TemplateEncoder(spec, tokenizer)
    return _ENCODERS[key]


def encode_batch(batch: dict[str, list], spec: FormatSpec, max_length: int, tokenizer=None) -> dict[str, list]:
    """Batched `datasets.map` function: messages → input_ids, labels (truncated), full length, role token counts."""
    enc = get_encoder(spec, tokenizer)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "role_tokens": []}
    encoded = enc.encode_many(batch["messages"]) if hasattr(enc, "encode_many") else map(enc.encode, batch["messages"])
    for ids, labels, roles in encoded:
        out["length"].append(len(ids))
        out["input_ids"].append(ids[:max_length])
        out["labels"].append(labels[:max_length])
        out["role_tokens"].append(roles)
    return out
