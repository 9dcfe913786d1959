"""Hashing: a file's sha256 (memoized by path, size and times under $OVDET_HOME), a state dict's digest."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

from ovdet.util.env import home

CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: str | Path, memo_dir: Path | None = None) -> str:
    """file_sha256, memoized in `memo_dir` (default $OVDET_HOME/hashes) by (real path, size, mtime, ctime,
    inode, device): a file is hashed once, and again only when it changes."""
    real = Path(path).resolve()
    st = real.stat()
    key = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
    memo = (memo_dir or home() / "hashes") / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        digest = memo.read_text(encoding="ascii")
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return digest
    except (OSError, UnicodeDecodeError):
        pass  # not memoized yet (or a damaged memo): hash the file
    digest = file_sha256(real)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".memo.", suffix=".part")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(digest)
        os.replace(tmp, memo)
    except OSError as exc:
        warnings.warn(f"Cannot memoize the hash of {real} in {memo.parent} ({exc}); it will be hashed again next "
                      "time.", stacklevel=2)
    return digest


def state_digest(state_dict) -> str:
    """16 hex of a sha256 over a torch state dict's keys and tensor bytes: the identity of in-memory weights."""
    import torch  # here, so that weights management stays importable without loading torch

    digest = hashlib.sha256()
    for key, value in state_dict.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
