"""Part files: what one Ray worker call finished, written whole (atomic rename) and merged once by the driver.

A part is a JSONL file in OUT/.ovdet-ray/parts/, one line per image: {"ok": <predictions.jsonl record>} or
{"error": <errors.jsonl record>}. Its name is the driver's run token and a digest of the output keys it covers,
so a call that Ray retries (its worker was killed after writing) rewrites the same part instead of adding a
second one, and the driver tells its own parts from those a killed driver left.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ovdet.util.safeio import atomic_write

__all__ = ["PARTS", "RUN_TOKEN", "list_parts", "part_dir", "part_prefix", "read_part", "write_part"]

PARTS = ".ovdet-ray"  # under OUT; listed in ovdet.runs.folder.OUTPUTS, so --overwrite clears it
RUN_TOKEN = "run"  # file in PARTS holding the driver's token: a worker that cannot read it cannot see OUT


def part_dir(out: str | os.PathLike) -> Path:
    return Path(out) / PARTS / "parts"


def part_prefix(token: str) -> str:
    """How the names of the parts of the run with this driver token start."""
    return f"part-{token[:12]}-"


def write_part(out: str | os.PathLike, token: str, keys: Sequence[str], lines: Sequence[dict[str, Any]]) -> str:
    """Write one part of the run with driver token `token` atomically; returns its file name."""
    name = part_prefix(token) + hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()[:20] + ".jsonl"
    text = "".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in lines)
    atomic_write(part_dir(out) / name, text)
    return name


def read_part(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The lines of one part file."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def list_parts(out: str | os.PathLike) -> list[Path]:
    """The finished part files under OUT (temporary files of unfinished writes are not listed)."""
    folder = part_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.name.endswith(".jsonl"))
