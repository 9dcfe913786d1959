"""Output file stems ("keys") for the images of a run: flat, unique case-insensitively, plain names everywhere.

`sub/dir/a.jpg` gets the key `sub__dir__a`, and its outputs are `labels/sub__dir__a.txt`, `images/sub__dir__a.jpg`
and so on. Image names are whatever the input folder holds: a backslash, a newline, an ESC or an undecodable byte
is a legal part of a Linux file name, so each becomes "_" in the key (the key must be a plain file name on every
system and a line of its own in list files), and a very long path is cut and made unique by a digest of it.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from ovdet.util.display import UNSAFE

__all__ = ["KEY_BYTES", "flat_key"]

# Longest key in UTF-8 bytes: room for "_jpeg_12" and ".xml" under the usual 255-byte file name limit.
KEY_BYTES = 200


def flat_key(rel: str, used: set[str]) -> str:
    """A key for the image at `rel` (POSIX path relative to the input folder) that is not in `used` (lowercased
    keys); it is added there. A clash gets the suffix added (a.jpg, a.png -> a, a_png), then a number."""
    p = PurePosixPath(rel)
    base = UNSAFE.sub("_", str(p.with_suffix("")).replace("/", "__").replace("\\", "_"))
    if len(base.encode("utf-8")) > KEY_BYTES:
        digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        base = base.encode("utf-8")[:KEY_BYTES - 13].decode("utf-8", "ignore") + "-" + digest
    ext = UNSAFE.sub("_", p.suffix.lstrip(".").lower())
    candidates = [base, f"{base}_{ext}"]
    n = 2
    while True:
        for key in candidates:
            if key.lower() not in used:
                used.add(key.lower())
                return key
        candidates = [f"{base}_{ext}_{n}"]
        n += 1
