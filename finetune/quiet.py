"""Silence the library messages we know are noise, each one exactly, where it is emitted; all else still shows.

Users cannot tell a library's advice to itself from an error, so every command starts free of it. Each entry
names the logger or warning location and the message it matches, and why it is harmless; a new message, or the
same message from elsewhere, still reaches the user. `install()` must run before the import that emits them
(bitsandbytes logs at import), so the CLI calls it first thing.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (logger name, message prefix): logging records dropped by a filter on that one logger.
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    # bitsandbytes 0.50, on AVX512-BF16 CPUs, at import: it tries to fetch an optional faster CPU kernel from the
    # Hub via the `kernels` package and falls back to its own kernel, which is the one we test against.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)

# (message regex, category, module regex of the warning's location): passed to warnings.filterwarnings.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # transformers 5 renamed the property; TRL 1.16 (trl.models.utils, around generation) still reads the old name.
    (
        r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
        FutureWarning,
        r"transformers\.modeling_utils",
    ),
    # torch 2.13's DDP deprecates broadcast_buffers, which accelerate passes on from TrainingArguments. We set it to
    # False on purpose (train.arguments.trainer_arguments: buffers are identical on every rank, so none is synced at init or
    # per step), and torch's own message says to keep broadcast_buffers=False for exactly that case.
    (
        r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers` instead",
        FutureWarning,
        r"accelerate\.accelerator",
    ),
)


# The libraries' own switches for their tqdm bars (datasets' map, transformers' weight loading and saving), read
# when they are imported. Set only when stderr is not a terminal, and never over the user's own setting.
# TQDM_DISABLE: tqdm's own switch, for libraries that draw bars with no switch of their own (lm-eval's request and
# context bars in `finetune eval`); tqdm reads it at import, which comes after install().
PROGRESS_BAR_SWITCHES = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`; lets every other record through."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Install the filters once per process (idempotent); piped, the libraries' progress bars go off too."""
    for name, prefix in KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)  # the same object the library gets later with getLogger(__name__)
        if not any(isinstance(f, DropMessages) and prefix in f.prefixes for f in logger.filters):
            logger.addFilter(DropMessages((prefix,)))
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    no_progress_bars_when_piped()


def no_progress_bars_when_piped(stream=None) -> bool:
    """Into a log file or CI, a tqdm bar is a stream of `\\r` frames, not progress: when stderr is not a terminal,
    switch the libraries' bars off (their environment switches, which launched ranks inherit; and the libraries
    already imported). Returns whether it did. The run's own progress is console.ReadableProgress's plain lines."""
    stream = sys.stderr if stream is None else stream
    if stream is None or (hasattr(stream, "isatty") and stream.isatty()):
        return False
    for name in PROGRESS_BAR_SWITCHES:
        os.environ.setdefault(name, "1")
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    return True
