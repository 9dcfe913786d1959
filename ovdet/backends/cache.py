"""Compiled-model cache: exported graphs (ONNX, OpenVINO IR) under $OVDET_HOME/compiled, built once per key.

An entry is a folder named `<model>-<backend>-<kind>-<digest>`, the digest taken over everything that changes the
file: the weights' identity, backend, precision kind (+ calibration digest for int8), graph version and library
versions. It is built in a temporary folder and renamed into place, so readers never see half an entry; its
`meta.json` (written last) lists each file's size, and an entry that fails that check or fails to load is removed
and rebuilt with a warning. Entries hold only graph files (xml/bin/onnx/engine) and JSON, never pickles; an
OpenVINO entry also holds OpenVINO's compiled blobs (`openvino_blobs/`, its CACHE_DIR: one per precision, written and
checked by OpenVINO itself, which compiles again when one is damaged).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ovdet.errors import ModelError, OVDetWarning
from ovdet.weights.registry import home

GRAPH_VERSION = 1  # bump when LiveWorldGraph or the export settings change what a file computes
META = "meta.json"
_STALE_TMP_S = 3600.0
T = TypeVar("T")


class CompiledCacheWarning(OVDetWarning):
    """A compiled-model cache entry was unreadable and is being rebuilt (or cannot be stored)."""


@dataclass
class CompiledEntry:
    """One cached compiled model, as `ovdet cache info` lists it."""

    name: str
    path: Path
    bytes: int
    fields: dict[str, Any]


def compiled_dir() -> Path:
    """Where compiled models live: $OVDET_HOME/compiled."""
    return home() / "compiled"


def library_versions(*names: str) -> dict[str, str]:
    """Versions of torch, ultralytics, ovdet and the given runtime packages: part of every cache key."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "ultralytics", "ovdet", *names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "none"
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text)[:48] or "model"


class CompiledCache:
    """Build-once store of compiled models keyed by a dict of fields (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else compiled_dir()

    def path_for(self, fields: Mapping[str, Any]) -> Path:
        """The entry folder for these key fields (it may not exist yet)."""
        blob = json.dumps({"graph": GRAPH_VERSION, **fields}, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        name = "-".join(_slug(str(fields.get(k, "x"))) for k in ("model", "backend", "kind"))
        return self.root / f"{name}-{digest}"

    def get_or_build(self, fields: Mapping[str, Any], build: Callable[[Path], None],
                     load: Callable[[Path], T]) -> tuple[T, bool]:
        """`load(entry)` of the cached entry, building it first with `build(folder)` if missing or unusable.

        Returns (loaded, built): `built` is False when the cache served it. A failing `build` raises; an entry
        that exists but cannot be loaded is deleted and rebuilt once, with a CompiledCacheWarning."""
        path = self.path_for(fields)
        if path.is_dir():
            problem = _check(path)
            if problem is None:
                try:
                    return load(path), False
                except Exception as exc:  # noqa: BLE001 - any failure to load a cached file means: rebuild it
                    problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            warnings.warn(f"compiled-model cache entry {path} is unusable ({problem}); rebuilding it",
                          CompiledCacheWarning, stacklevel=3)
            shutil.rmtree(path, ignore_errors=True)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
        except OSError as exc:  # a read-only home: build in a private temporary folder, do not keep it
            import tempfile

            warnings.warn(f"cannot write the compiled-model cache under {self.root} ({exc}); the model is compiled "
                          "for this run only. Set OVDET_HOME to a writable folder to keep it.",
                          CompiledCacheWarning, stacklevel=3)
            tmp = Path(tempfile.mkdtemp(prefix="ovdet-compiled-"))
            build(tmp)
            return load(tmp), True
        try:
            build(tmp)
            _write_meta(tmp, fields)
            try:
                os.replace(tmp, path)
            except OSError:  # another process put the same entry in place first: use theirs
                if not path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._sweep_stale()
        return load(path), True

    def entries(self) -> list[CompiledEntry]:
        """Every complete entry, largest first."""
        out = []
        if not self.root.is_dir():
            return out
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                meta = json.loads((path / META).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {"fields": {"state": "incomplete or corrupt: rebuilt when next used"}}
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            out.append(CompiledEntry(path.name, path, size, dict(meta.get("fields", {}))))
        return sorted(out, key=lambda e: -e.bytes)

    def clear(self) -> tuple[int, int]:
        """Delete every entry (and leftovers of crashed builds); returns (entries, bytes) removed."""
        entries = self.entries()
        gone = sum(e.bytes for e in entries)
        if self.root.is_dir():
            for path in self.root.iterdir():
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return len(entries), gone

    def _sweep_stale(self) -> None:
        """Remove temporary folders that crashed builds left behind (older than an hour)."""
        now = time.time()
        for path in self.root.glob(".tmp-*"):
            try:
                if now - path.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _write_meta(folder: Path, fields: Mapping[str, Any]) -> None:
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    meta = {"graph": GRAPH_VERSION, "fields": dict(fields), "files": files, "created": time.time()}
    (folder / META).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")


def _check(folder: Path) -> str | None:
    """None if every file meta.json lists is there with its size, else what is wrong."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        files = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable {META}: {type(exc).__name__}"
    for name, size in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return None


def require_module(module: str, install: str, what: str) -> Any:
    """Import `module` or raise a ModelError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"{what} needs the {module!r} package, which is not installed: {install}") from exc


def require_installed(module: str, install: str, what: str) -> None:
    """The ModelError of `require_module` when `module` is not installed, without importing it: for a package that
    only a build needs (nncf takes ~2 s to import, and a cached int8 model runs without it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModelError(f"{what} needs the {module!r} package, which is not installed: {install}")
