"""Silence the library messages we know are noise, each one exactly, where it is emitted; all else still shows.

Users cannot tell a library's advice to itself from an error, so every command starts free of it. Each entry
names the logger or warning location and the message it matches, and why it is harmless; a new message, or the
same message from elsewhere, still reaches the user. `install()` must run before the import that emits them
(bitsandbytes logs at import), so the CLI calls it first thing.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, message prefix): logging records dropped by a filter on that one logger.
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    # bitsandbytes 0.50, on AVX512-BF16 CPUs, at import: it tries to fetch an optional faster CPU kernel from the
    # Hub via the `kernels` package and falls back to its own kernel, which is the one we test against.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)

# (message regex, category, module regex of the warning's location): passed to warnings.filterwarnings.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # transformers 5 renamed the property; PEFT (PeftModel.__init__) and TRL still read the old name.
    (
        r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
        FutureWarning,
        r"transformers\.modeling_utils",
    ),
)


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`; lets every other record through."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Install the filters once per process (idempotent)."""
    for name, prefix in KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)  # the same object the library gets later with getLogger(__name__)
        if not any(isinstance(f, DropMessages) and prefix in f.prefixes for f in logger.filters):
            logger.addFilter(DropMessages((prefix,)))
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
