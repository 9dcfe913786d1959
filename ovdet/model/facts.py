"""What a detector must know of a checkpoint before it runs it (stride, text width, training size, the embedded text
tower's identity), kept per file digest, so that a warm start on an exported backend never unpickles weights it does
not run.

A checkpoint read once (and found safe) leaves `$OVDET_HOME/facts/<key>.json`, keyed like the memo of
ovdet.util.hashing.cached_sha256 by the file's real path, size, mtime, ctime, inode and device, so a file that changes
in any way has no facts, and a start with facts neither hashes nor reads the file. It then reads the weights only when
something needs them: a compiled model not yet in the cache, region exemplars, a worker payload, or a prompt that
the embedding cache does not hold (then the embedded text tower, an `EmbeddedTower`, is read).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ovdet.errors import OVDetWarning
from ovdet.util.safeio import atomic_write
from ovdet.weights.registry import home

FACTS_VERSION = 1  # bump when the fields change: older files are then read as absent


@dataclass(frozen=True)
class ModelFacts:
    """The facts of one checkpoint file (see the module docstring)."""

    sha256: str  # of the file's bytes: its identity (model_id), as cached_sha256 gave it when it was read
    stride: int  # the largest stride of the head, at least 32: image sizes are multiples of it
    embed_dim: int  # the width of a class embedding
    train_imgsz: int  # the size it was trained at: the default inference size
    text_tower: str | None  # identity (name@sha) of the text tower embedded in the checkpoint; None: it has none
    imgsz_warning: str | None = None  # what reading its training size warned about (said again on every start)


def facts_path(path: str | os.PathLike) -> Path:
    """Where the facts of this checkpoint file, as it is now, live."""
    real = Path(path).resolve()
    st = real.stat()
    key = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
    return home() / "facts" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def read_facts(path: str | os.PathLike) -> ModelFacts | None:
    """The stored facts of this file, or None when there are none (never read, changed since, another version, or a
    damaged facts file: then the caller reads the checkpoint itself, which is always right)."""
    try:
        data = json.loads(facts_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.pop("version", None) != FACTS_VERSION:
        return None
    try:
        facts = ModelFacts(**data)
    except TypeError:
        return None
    ints = (facts.stride, facts.embed_dim, facts.train_imgsz)
    texts = (facts.text_tower, facts.imgsz_warning)
    if not all(type(v) is int and v > 0 for v in ints) or not all(v is None or isinstance(v, str) for v in texts) \
            or not (isinstance(facts.sha256, str) and len(facts.sha256) == 64):
        return None
    return facts


def write_facts(path: str | os.PathLike, facts: ModelFacts) -> None:
    """Keep the facts for the next start; a home that cannot be written only means reading the weights again."""
    try:
        target = facts_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, json.dumps({"version": FACTS_VERSION, **asdict(facts)}, indent=1))
    except OSError as exc:
        warnings.warn(f"Cannot keep the facts of {path} under {home() / 'facts'} ({exc}); every start reads the whole "
                      "checkpoint. Set OVDET_HOME to a writable folder to avoid it.", OVDetWarning, stacklevel=2)


class EmbeddedTower(Mapping):
    """The text tower state embedded in a checkpoint (TextEncoder.to_state() form), read by `load()` on first access.
    `identity` is known without reading it: ovdet.text.cache looks embeddings up by it, so prompts that are all
    cached never read the checkpoint."""

    def __init__(self, identity: str, load: Callable[[], Mapping[str, Any]]):
        self.identity = identity
        self._load = load
        self._state: Mapping[str, Any] | None = None

    def _loaded(self) -> Mapping[str, Any]:
        if self._state is None:
            self._state = self._load()
        return self._state

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"EmbeddedTower({self.identity}, {'read' if self._state is not None else 'not read yet'})"
