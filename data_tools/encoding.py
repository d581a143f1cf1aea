"""Is a data file UTF-8 text? Decide from its bytes, and say where it is not (`FILE:LINE: ...`).

Data files are read as UTF-8 (a leading byte-order mark is accepted and dropped). Anything else — a latin-1 byte,
UTF-16, a gzip file — used to reach the user as a traceback or as an error that named no file; here it becomes one
line naming the file, the line, the byte and the fix.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from data_tools.errors import DataError

UTF8_BOM = codecs.BOM_UTF8
SNIFF_BYTES = 64 * 1024  # what `check_source` reads of each file
COMPRESSED = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)
WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
FIX = "save it as UTF-8 (e.g. iconv -t UTF-8)"


def compressed_kind(head: bytes) -> str | None:
    """The compression a file's first bytes announce, or None."""
    return next((name for magic, name in COMPRESSED if head.startswith(magic)), None)


def compressed_problem(file: Path, head: bytes) -> str | None:
    kind = compressed_kind(head)
    return f"{file}: {kind}-compressed file; decompress it first" if kind else None


def text_problem(file: Path, data: bytes, final: bool = True) -> str | None:
    """Why `data` (the whole file, or its first bytes when `final` is False) is not UTF-8 text, or None."""
    problem = compressed_problem(file, data)
    if problem:
        return problem
    for bom, name in WIDE_BOMS:  # UTF-32 LE starts like UTF-16 LE, so it is tested first
        if data.startswith(bom):
            return f"{file}:1: not UTF-8 text ({name} byte-order mark at the start); {FIX}"
    body = data[len(UTF8_BOM) :] if data.startswith(UTF8_BOM) else data
    offset = len(data) - len(body)
    nul = body.find(b"\x00")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(body, final=final)
    except UnicodeDecodeError as e:
        bad = e.start if nul < 0 else min(e.start, nul)
        return _at(file, data, offset + bad)
    if nul >= 0:  # valid UTF-8 but with NUL bytes: UTF-16 without a byte-order mark, or a binary file
        return _at(file, data, offset + nul)
    return None


def _at(file: Path, data: bytes, pos: int) -> str:
    line = data.count(b"\n", 0, pos) + 1
    column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    hint = " (UTF-16 text or a binary file?)" if data[pos] == 0 else ""
    return f"{file}:{line}: not UTF-8 text (byte 0x{data[pos]:02x} at column {column}){hint}; {FIX}"


def decode(file: Path, data: bytes) -> str:
    """The text of a whole file, without a leading byte-order mark; DataError naming FILE:LINE when it is not UTF-8."""
    problem = text_problem(file, data)
    if problem:
        raise DataError(problem)
    return data.decode("utf-8-sig")


def decode_line(file: Path, number: int, line: bytes) -> str:
    """One line of a JSON Lines file (`number` from 1); DataError naming FILE:LINE when it is not UTF-8."""
    if number == 1:
        problem = compressed_problem(file, line) or next(
            (
                f"{file}:1: not UTF-8 text ({name} byte-order mark at the start); {FIX}"
                for bom, name in WIDE_BOMS
                if line.startswith(bom)
            ),
            None,
        )
        if problem:
            raise DataError(problem)
        if line.startswith(UTF8_BOM):
            line = line[len(UTF8_BOM) :]
    nul = line.find(b"\x00")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(_line_at(file, number, line, e.start if nul < 0 else min(nul, e.start))) from None
    if nul >= 0:
        raise DataError(_line_at(file, number, line, nul))
    return text


def _line_at(file: Path, number: int, line: bytes, pos: int) -> str:
    hint = " (UTF-16 text or a binary file?)" if line[pos] == 0 else ""
    return f"{file}:{number}: not UTF-8 text (byte 0x{line[pos]:02x} at column {pos + 1}){hint}; {FIX}"
