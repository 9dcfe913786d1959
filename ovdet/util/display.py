"""Show untrusted strings (class names, file names, messages quoting them) safely in a terminal or a log.

File names and class names come from users and from whoever wrote the files: an ESC byte in one would be read by
the terminal as a command (colours, a new window title, a rewritten line), a bidi override would reorder what is
shown, a newline would forge a log line. `shown(text)` writes each such character as a visible escape instead:
`\\x1b`, `\\u202e`, `\\n`, and a byte that was not valid UTF-8 (Python's surrogateescape, as in file names read
from disk) as `\\xff`. Everything else, accents, CJK and emoji included, is shown unchanged.
"""

from __future__ import annotations

import os
import re

__all__ = ["UNSAFE", "first_unsafe", "json_shown", "shown"]

# C0 and C1 controls and DEL (category Cc), lone surrogates (Cs: undecodable bytes), line/paragraph separators
# (Zl, Zp), and the bidi marks, embeddings, overrides and isolates (Trojan-Source reordering).
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not valid UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object) -> str:
    """`str(text)` (a path too) with every control, bidi and undecodable character written as a visible escape."""
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    return UNSAFE.sub(lambda m: _escape(m.group()), text)


def json_shown(dumped: str) -> str:
    """A `json.dumps(..., ensure_ascii=False)` string with the characters json leaves raw (C1, DEL, bidi,
    separators, lone surrogates) written as \\uXXXX escapes: the same JSON value, safe to print."""
    return UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)


def first_unsafe(text: str) -> tuple[int, str] | None:
    """(position, escape) of the first character `shown` would escape, or None when there is none."""
    match = UNSAFE.search(text)
    return None if match is None else (match.start(), _escape(match.group()))
