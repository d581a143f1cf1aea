"""Secrets never reach a file or a dashboard: keys that look secret, and values of secret environment variables.

Used wherever the resolved recipe, a command line or a run config is written: the run folder, checkpoints, W&B.
"""

from __future__ import annotations

import os
import re
from typing import Any

_SECRET_PART = re.compile(
    r"(?:^|[_\-.])(?:token|api_?key|key|secret|password|passwd|credentials?|auth)(?:$|[_\-.])", re.I
)
_NOT_SECRET = re.compile(r"(?:^|_)(?:max|min|num|new|pad|bos|eos|unk|sep|add|special)_", re.I)
SCRUBBED = "***"


def is_secret_key(key: str) -> bool:
    """`hf_token`, `api_key`, `WANDB_API_KEY`, `password` are; `max_new_tokens`, `pad_token`, `messages` are not."""
    return bool(_SECRET_PART.search(str(key))) and not _NOT_SECRET.search(str(key))


def secret_values() -> set[str]:
    """Values of secret-looking environment variables (WANDB_API_KEY, HF_TOKEN, ...), to scrub wherever they appear."""
    return {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 8}


def scrub_secrets(data: Any, _secrets: set[str] | None = None) -> Any:
    """A copy of `data` with every string under a secret-looking key, or equal to a secret env value, replaced."""
    secrets = secret_values() if _secrets is None else _secrets
    if isinstance(data, dict):
        return {
            k: SCRUBBED if is_secret_key(k) and isinstance(v, str) and v else scrub_secrets(v, secrets)
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [scrub_secrets(v, secrets) for v in data]
    if isinstance(data, str) and any(s in data for s in secrets):
        for s in secrets:
            data = data.replace(s, SCRUBBED)
    return data


def scrub_argv(argv: list[str]) -> list[str]:
    """A command line with `key=value` secrets (by key or by value) scrubbed."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{key}={SCRUBBED}" if eq and value and is_secret_key(key.rpartition(".")[2]) else arg)
    return scrub_secrets(out)


def scrub_yaml(text: str) -> str:
    """A YAML document (the resolved recipe) with its secrets scrubbed; unchanged text when there are none."""
    import yaml

    data = yaml.safe_load(text)
    clean = scrub_secrets(data)
    return text if clean == data else yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)
