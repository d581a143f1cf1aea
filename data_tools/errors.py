"""Errors for bad data: one `FILE:LINE: reason` line per problem, reported all at once."""

from __future__ import annotations

from finetune.errors import UserError


class DataError(UserError):
    """Bad data records or data settings; the CLI prints `problems` and exits with code 2."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message, problems)
