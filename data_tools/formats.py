"""Input formats → the two canonical forms.

Conversation: `[{"role": "system"|"user"|"assistant", "content": str}, ...]` (OpenAI messages).
Preference: `{"prompt": [messages ending with a user turn], "chosen": [assistant message], "rejected": [...]}`,
which is TRL's conversational preference form.
Unpaired (KTO): `{"prompt": [messages ending with a user turn], "completion": [assistant message], "label": bool}`,
TRL's conversational unpaired preference form; `unpair` turns each pair into one desirable and one undesirable record.

Converters raise `Problem` with a reason code; the validator turns it into `FILE:LINE: reason`.
"""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
}
CONVERSATION_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
PREFERENCE_FORMATS = ("preference", "hh_rlhf")
UNPAIRED_FORMATS = ("unpaired",)
LABEL_TEXT = {"true": True, "false": False}  # CSV cells hold labels as text
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class Problem(Exception):
    """A record that cannot be used; `reason` is a short code counted in reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys suggest, or None."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        chosen = record["chosen"]
        if "prompt" not in keys and isinstance(chosen, str) and "\n\nHuman:" in chosen:
            return "hh_rlhf"
        return "preference"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _field(record: dict[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise Problem("missing_field", f"missing field {key!r}")
    return record[key]


def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Problem("non_string_content", f"{what}: content is {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise Problem("empty_content", f"{what}: empty content")
    return value


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    """OpenAI-style message list → canonical messages (checks roles and contents, not their order)."""
    if not isinstance(value, list):
        raise Problem("missing_field", f"{what} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or "role" not in m:
            raise Problem("missing_field", f"{what} message {i}: missing field 'role'")
        if m["role"] not in ROLES:
            raise Problem("unknown_role", f"{what} message {i}: unknown role {m['role']!r} (use system/user/assistant)")
        if "content" not in m:
            raise Problem("missing_field", f"{what} message {i} ({m['role']}): missing field 'content'")
        out.append({"role": m["role"], "content": _text(m["content"], f"{what} message {i} ({m['role']})")})
    return out


def to_conversation(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """Any format → canonical messages (preference records give prompt + chosen)."""
    if fmt == "messages":
        return _messages(_field(record, "messages"), "messages")
    if fmt == "sharegpt":
        turns = _field(record, "conversations")
        if not isinstance(turns, list):
            raise Problem("missing_field", "'conversations' must be a list")
        out = []
        for i, t in enumerate(turns, start=1):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise Problem("missing_field", f"conversations turn {i}: needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise Problem("unknown_role", f"conversations turn {i}: unknown role {t['from']!r}")
            out.append({"role": role, "content": _text(t["value"], f"conversations turn {i} ({t['from']})")})
        return out
    if fmt == "alpaca":
        instruction = _text(_field(record, "instruction"), "instruction")
        extra = record.get("input") or ""
        extra = _text(extra, "input", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out = [{"role": "user", "content": prompt}]
        out.append({"role": "assistant", "content": _text(_field(record, "output"), "output")})
        if isinstance(record.get("system"), str) and record["system"].strip():
            out.insert(0, {"role": "system", "content": record["system"]})
        return out
    if fmt == "prompt_completion":
        prompt, completion = _field(record, "prompt"), _field(record, "completion")
        prompt_msgs = (
            _messages(prompt, "prompt")
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text(prompt, "prompt")}]
        )
        if isinstance(completion, list):
            return prompt_msgs + _messages(completion, "completion")
        return [*prompt_msgs, {"role": "assistant", "content": _text(completion, "completion")}]
    if fmt == "text":
        return [{"role": "assistant", "content": _text(_field(record, "text"), "text")}]
    if fmt in PREFERENCE_FORMATS:
        pair = to_preference(record, fmt)
        return pair["prompt"] + pair["chosen"]
    if fmt in UNPAIRED_FORMATS:
        raise Problem(
            "format_mismatch", "an unpaired record (prompt, completion, label) is not a conversation to train on"
        )
    raise Problem("unknown_format", f"unknown format {fmt!r}")


def parse_hh(transcript: Any, what: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: … \\n\\nAssistant: …` → messages."""
    text = _text(transcript, what)
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise Problem("missing_field", f"{what}: text before the first '\\n\\nHuman:' turn")
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        out.append({"role": "user" if speaker == "Human" else "assistant", "content": _text(content.strip(), what)})
    if not out:
        raise Problem("missing_field", f"{what}: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return out


def _side(value: Any, what: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return _messages(value, what)
    return [{"role": "assistant", "content": _text(value, what)}]


def to_preference(record: dict[str, Any], fmt: str) -> dict[str, list[dict[str, str]]]:
    """Preference pair (strings, message lists or HH transcripts) → canonical prompt/chosen/rejected."""
    if fmt == "hh_rlhf":
        chosen, rejected = (
            parse_hh(_field(record, "chosen"), "chosen"),
            parse_hh(_field(record, "rejected"), "rejected"),
        )
        prompt = None
    elif fmt == "preference":
        chosen, rejected = _side(_field(record, "chosen"), "chosen"), _side(_field(record, "rejected"), "rejected")
        raw_prompt = record.get("prompt")
        if raw_prompt is None:
            prompt = None
        elif isinstance(raw_prompt, list):
            prompt = _messages(raw_prompt, "prompt")
        else:
            prompt = [{"role": "user", "content": _text(raw_prompt, "prompt")}]
    else:
        raise Problem("unknown_format", f"format {fmt!r} is not a preference format (use preference or hh_rlhf)")
    if prompt is None:  # full conversations on both sides: the shared part is the prompt
        if chosen[:-1] != rejected[:-1]:
            raise Problem("missing_field", "chosen and rejected conversations have different prompts")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not prompt:
        raise Problem("missing_field", "missing field 'prompt'")
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise Problem("no_assistant", f"{side} must be one assistant reply")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise Problem("identical_pair", "chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    raw = _field(record, "prompt")
    if isinstance(raw, list):
        return _messages(raw, "prompt")
    return [{"role": "user", "content": _text(raw, "prompt")}]


def _label(value: Any) -> bool:
    """A desirable (true) / undesirable (false) label: a JSON boolean, or true/false text (CSV cells)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in LABEL_TEXT:
        return LABEL_TEXT[value.strip().lower()]
    shown = repr(value) if isinstance(value, str) else type(value).__name__
    raise Problem("bad_label", f"label must be true (desirable) or false (undesirable), got {shown}")


def to_unpaired(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Unpaired record (string or message-list prompt and completion) → canonical prompt/completion/label."""
    if fmt not in UNPAIRED_FORMATS:
        raise Problem("unknown_format", f"format {fmt!r} is not the unpaired format")
    prompt = _prompt(record)
    completion = _side(_field(record, "completion"), "completion")
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise Problem("no_assistant", "completion must be one assistant reply")
    return {"prompt": prompt, "completion": completion, "label": _label(_field(record, "label"))}


def unpair(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """One pair → a desirable (chosen) and an undesirable (rejected) unpaired record; other keys (`where`) kept."""
    rest = {k: v for k, v in pair.items() if k not in ("prompt", "chosen", "rejected")}
    return [
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, **rest},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, **rest},
    ]
