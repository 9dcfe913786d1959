"""Disk cache of prompt embeddings, keyed by the text tower's identity and the exact prompt string.

Layout under `$OVDET_HOME/embeddings`: `prompts/<tower>/<sha256(prompt)>.emb`, one small file per prompt (header,
prompt, float32 vector, crc32), written to a temporary file and renamed into place so that concurrent processes
never see a partial entry; `sources/` memoizes file hashes by (path, size, times, inode). The total size is bounded
(least recently used entries go first). `LazyTextEncoder` computes a tower's identity from its source without
loading it, so prompts that are all cached never construct the text model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovdet.errors import OVDetError, WeightsCorruptError
from ovdet.options import EMBEDDING_CACHE_MB_ENV as MAX_MB_ENV  # defined there so that the CLI parser needs no torch
from ovdet.util.hashing import cached_sha256, state_digest
from ovdet.util.safeio import TMP_SUFFIX, Folder
from ovdet.weights.registry import home, resolve_text_model

if TYPE_CHECKING:  # the tower (torch, transformers) is imported only when a prompt is not in the cache
    import torch

    from ovdet.text.tower import TextEncoder

DEFAULT_MAX_MB = 128.0
_MAGIC = b"OVDE"
_HEADER = struct.Struct("<4sBxxxIII")  # magic, version, pad, prompt bytes, dim, crc32 of prompt + vector
_VERSION = 1
_SUFFIX = ".emb"
_TOUCH_AFTER_S = 3600.0  # a hit refreshes an entry's recency at most this often (one utime per hour)
_STALE_TMP_S = 3600.0  # temporary files older than this were left by a crashed writer
_EVICT_TO = 0.9  # eviction frees down to this fraction of the limit, so that it does not run on every write


@dataclass
class TowerUsage:
    """Entries and bytes cached for one text tower."""

    identity: str
    entries: int = 0
    bytes: int = 0


@dataclass
class CacheInfo:
    """What `EmbeddingCache.info()` reports."""

    root: Path
    max_bytes: int
    entries: int = 0
    bytes: int = 0
    towers: list[TowerUsage] = field(default_factory=list)


def _disk_bytes(st: os.stat_result) -> int:
    """Space a file takes on disk (blocks), or its length where the platform does not say."""
    blocks = getattr(st, "st_blocks", None)
    return blocks * 512 if blocks is not None else st.st_size


def _slug(identity: str) -> str:
    """A folder name for a tower identity: readable, filesystem-safe and unique (sha suffix)."""
    readable = re.sub(r"[^A-Za-z0-9._@+-]+", "_", identity)[:80]
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole (ovdet.util.safeio: a temporary file renamed over it, so that concurrent
    processes never see a partial entry); its folder is created, again if a concurrent `clear` removes it meanwhile."""
    for attempt in range(2):
        try:
            # root = the entry's own folder: the cache lives where the user's OVDET_HOME points, links included
            with Folder(path.parent, root=path.parent) as folder:
                folder.write(path.name, data)
            return
        except FileNotFoundError:  # a concurrent `clear` removed the folder between its creation and the write
            if attempt:
                raise


def _entry_name(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32] + _SUFFIX


def _encode_entry(prompt: str, vector: np.ndarray) -> bytes:
    text = prompt.encode("utf-8")
    body = text + vector.astype("<f4", copy=False).tobytes()
    return _HEADER.pack(_MAGIC, _VERSION, len(text), vector.shape[0], zlib.crc32(body)) + body


def _decode_entry(data: bytes, prompt: bytes) -> np.ndarray | None:
    """The vector of an entry for exactly `prompt`, or None when the bytes are not a complete, intact entry."""
    if len(data) < _HEADER.size:
        return None
    magic, version, text_len, dim, crc = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size:]
    if (magic != _MAGIC or version != _VERSION or len(body) != text_len + 4 * dim
            or body[:text_len] != prompt or zlib.crc32(body) != crc):
        return None
    return np.frombuffer(data, "<f4", count=dim, offset=_HEADER.size + text_len).astype(np.float32, copy=False)


class EmbeddingCache:
    """Prompt embeddings on disk under `root` (default `$OVDET_HOME/embeddings`), at most `max_bytes` in total."""

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else home() / "embeddings"
        if max_bytes is None:
            text = os.environ.get(MAX_MB_ENV) or str(DEFAULT_MAX_MB)
            try:
                max_bytes = int(float(text) * 2**20)
            except ValueError:
                raise OVDetError(f"{MAX_MB_ENV}={text!r} is not a number: set it to the cache size limit in "
                                 f"megabytes, e.g. {DEFAULT_MAX_MB:g}.") from None
        self.max_bytes = int(max_bytes)

    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    def _entry(self, identity: str, prompt: str) -> Path:
        return self.prompts_dir / _slug(identity) / _entry_name(prompt)

    def get(self, identity: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached float32 vectors of those `prompts` that are cached for this tower (missing ones left out)."""
        found: dict[str, np.ndarray] = {}
        now = time.time()
        folder = str(self.prompts_dir / _slug(identity))
        for prompt in dict.fromkeys(prompts):
            path = os.path.join(folder, _entry_name(prompt))  # plain strings: this loop is the warm path
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                continue
            except OSError as exc:
                warnings.warn(f"Cannot read cached embedding {path} ({exc}); encoding the prompt again.",
                              stacklevel=2)
                continue
            vector = _decode_entry(data, prompt.encode("utf-8"))
            if vector is None:  # damaged (e.g. power loss before the data reached the disk): drop it, re-encode
                Path(path).unlink(missing_ok=True)
                continue
            found[prompt] = vector
            if now - st.st_mtime > _TOUCH_AFTER_S:
                self._touch(path)
        return found

    @staticmethod
    def _touch(path: str) -> None:
        """Mark an entry as recently used, for eviction; a read-only cache simply keeps its old order."""
        try:
            os.utime(path)
        except OSError:
            pass  # recency is advisory: failing to record it must not fail a lookup

    def put(self, identity: str, prompts: Sequence[str], embeddings: Any) -> None:
        """Store one [D] float32 vector per prompt (rows of `embeddings`), then evict down to the size limit."""
        array = np.asarray(embeddings, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != len(prompts):
            raise ValueError(f"put() needs one embedding row per prompt: {len(prompts)} prompts, array "
                             f"{array.shape}")
        try:
            marker = self.prompts_dir / _slug(identity) / "identity"
            if not marker.exists():
                _write_atomic(marker, identity.encode("utf-8"))
            for prompt, vector in zip(prompts, array):
                _write_atomic(self._entry(identity, prompt), _encode_entry(prompt, vector))
        except OSError as exc:
            warnings.warn(f"Cannot write the embedding cache in {self.root} ({exc}); prompts will be encoded "
                          f"again next time. Set OVDET_HOME to a writable folder to keep them.", stacklevel=2)
            return
        self.evict()

    def _scan(self) -> list[tuple[float, int, Path]]:
        """(mtime, disk bytes, path) of every entry; removes temporary files left by crashed writers."""
        out = []
        if not self.prompts_dir.is_dir():
            return out
        now = time.time()
        for tower in os.scandir(self.prompts_dir):
            if not tower.is_dir():
                continue
            for entry in os.scandir(tower.path):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # evicted or cleared by another process meanwhile
                    continue
                if entry.name.endswith(_SUFFIX):
                    out.append((st.st_mtime, _disk_bytes(st), Path(entry.path)))
                # safeio's temporary names, and ".tmp-*.part" from versions that wrote their own
                elif entry.name.startswith(".") and entry.name.endswith((TMP_SUFFIX, ".part")) \
                        and now - st.st_mtime > _STALE_TMP_S:
                    Path(entry.path).unlink(missing_ok=True)
        return out

    def evict(self) -> int:
        """Delete least recently used entries until the cache fits `max_bytes` (with some headroom); count them."""
        entries = self._scan()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return 0
        removed = 0
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes * _EVICT_TO:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def info(self) -> CacheInfo:
        """Entries and bytes in total and per text tower."""
        info = CacheInfo(self.root, self.max_bytes)
        towers: dict[Path, TowerUsage] = {}
        for _, size, path in self._scan():
            usage = towers.get(path.parent)
            if usage is None:
                marker = path.parent / "identity"
                try:
                    identity = marker.read_text(encoding="utf-8")
                except OSError:
                    identity = path.parent.name
                usage = towers[path.parent] = TowerUsage(identity)
            usage.entries += 1
            usage.bytes += size
            info.entries += 1
            info.bytes += size
        info.towers = sorted(towers.values(), key=lambda u: u.identity)
        return info

    def clear(self) -> CacheInfo:
        """Delete every cached embedding and file-hash memo; returns what was there."""
        before = self.info()
        for name in ("prompts", "sources"):
            folder = self.root / name
            if folder.is_dir():
                # Rename first (atomic), so that concurrent writers recreate a fresh folder instead of failing.
                trash = self.root / f".trash-{uuid.uuid4().hex}"
                try:
                    os.replace(folder, trash)
                except FileNotFoundError:  # another process cleared it first
                    continue
                shutil.rmtree(trash)
        return before

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file, memoized under `sources/` by (real path, size, mtime, ctime, inode, device)."""
        return cached_sha256(path, memo_dir=self.root / "sources")

    def source_identity(self, path: Path) -> str:
        """`name@sha16` of a text-tower file, or of a Hugging Face folder (its config and weights files)."""
        path = Path(path)
        if not path.is_dir():
            return f"{path.stem}@{self.file_sha256(path)[:16]}"
        parts = [f"{f.name}:{self.file_sha256(f)}" for f in _tower_files(path)]
        return f"{path.name}@{hashlib.sha256(' '.join(parts).encode()).hexdigest()[:16]}"


def _tower_files(folder: Path) -> list[Path]:
    """The files transformers reads for a model folder: config and the preferred weights format (all files
    if neither is recognised, so that any change still changes the identity)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for pattern in (r"model.*\.safetensors(\.index\.json)?", r"pytorch_model.*\.bin(\.index\.json)?"):
        weights = [p for p in files if re.fullmatch(pattern, p.name)]
        if weights:
            return [p for p in files if p.name == "config.json"] + weights
    return files


def state_identity(state: Mapping[str, Any]) -> str:
    """`name@sha16` of a text tower saved with `TextEncoder.to_state()` (e.g. embedded in a checkpoint)."""
    if not isinstance(state, Mapping) or not isinstance(state.get("state_dict"), Mapping):
        raise WeightsCorruptError("The embedded text tower is malformed (no state_dict). Re-save the checkpoint, "
                                  "or pass a text model explicitly.")
    config = json.dumps(state.get("config"), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{config}\0{state_digest(state['state_dict'])}".encode()).hexdigest()[:16]
    return f"{state.get('name', 'embedded')}@{digest}"


class LazyTextEncoder:
    """A text tower known by its cache identity before it is loaded: prompts that are all cached never load it.

    `source` is a TextEncoder, a text-model name/path/Hugging Face id, or None (then `embedded_state`, a
    checkpoint's tower, else the default CLIP ViT-B/32).
    """

    def __init__(self, source: str | Path | TextEncoder | None = None, device: str | torch.device = "cpu",
                 embedded_state: Mapping[str, Any] | None = None, cache: EmbeddingCache | None = None):
        self.cache = cache if cache is not None else EmbeddingCache()
        self.device = str(device)
        self._source = source
        self._state = embedded_state if source is None else None
        self._encoder = source.to(self.device) if _is_tower(source) else None
        self._resolved: str | Path | None = None
        self._identity: str | None = None

    def _resolve(self) -> str | Path:
        if self._resolved is None:
            self._resolved = resolve_text_model(self._source)
        return self._resolved

    @property
    def identity(self) -> str:
        """Cache identity of the tower (name@sha of its source), computed without loading the model."""
        if self._identity is None:
            if _is_tower(self._source):
                self._identity = self._source.identity
            elif self._state is not None:  # a lazily read tower (ovdet.model.facts.EmbeddedTower) knows its identity
                self._identity = getattr(self._state, "identity", None) or state_identity(self._state)
            elif isinstance(source := self._resolve(), Path):
                self._identity = self.cache.source_identity(source)
            else:  # a Hugging Face id still to be downloaded: its weights are known only once loaded
                self._identity = self.encoder.identity
        return self._identity

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def encoder(self) -> TextEncoder:
        """The tower itself, loaded on first use."""
        if self._encoder is None:
            from ovdet.text.tower import TextEncoder

            if self._state is not None:
                encoder = TextEncoder.from_state(self._state)
            else:
                encoder = TextEncoder.load(self._resolve(), device=self.device)
            self._encoder = encoder.to(self.device)
            if isinstance(self._resolved, Path):  # key by what was loaded, even if the file changed meanwhile
                self._identity = self.cache.source_identity(self._resolved)
        return self._encoder

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """[N, D] float32 embeddings (numpy): cached ones read from disk, the others encoded (loading the tower, and
        with it torch), stored."""
        prompts = list(prompts)
        identity = self.identity
        found = self.cache.get(identity, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            encoder = self.encoder
            if self.identity != identity:  # the weights on disk changed before the tower was loaded
                return self.encode(prompts)
            fresh = encoder.encode(missing).float().cpu().numpy()
            self.cache.put(identity, missing, fresh)
            found.update(zip(missing, fresh))
        return np.stack([found[p] for p in prompts]).astype(np.float32, copy=False)


def _is_tower(source: Any) -> bool:
    """Whether `source` is a loaded TextEncoder (asked without importing the tower: unloaded, it cannot be one)."""
    tower = sys.modules.get("ovdet.text.tower")
    return tower is not None and isinstance(source, tower.TextEncoder)
