"""Text that comes from input files or arguments, made safe: control characters escaped before any of it is
shown (terminal, reports, model card), and small text files read only up to a size limit."""

from __future__ import annotations

import re
from pathlib import Path

# C0 and C1 controls, DEL, bidirectional overrides and isolates (which reorder what a terminal shows), line and
# paragraph separators, and lone surrogates (the bytes of a non-UTF-8 file name, as Python decodes them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control character (ESC, newline, bidi override, ...) written as an escape like `\\x1b`,
    so that text from a file can never move the cursor, recolour the terminal or hide what follows."""
    return _UNSAFE.sub(_escape, text)


class TooLargeError(ValueError):
    """A file is larger than what ctm reads of it."""


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of a file that must be small (a config, a recipe), reading at most `limit` + 1 bytes: a huge
    file or an endless one (`/dev/zero`) raises TooLargeError instead of filling the memory."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        size = f"{limit // 1024**2} MiB" if limit % 1024**2 == 0 else f"{limit} bytes"
        raise TooLargeError(f"larger than {size}")
    return data
