"""Stored vocabularies: named class lists kept in memory and, when persisted, as JSON under $OVDET_HOME/vocabularies
(read through, so the replicas of `ovdet serve --ray` on one machine share them).

A name is 1-64 characters of letters, digits, '.', '_' and '-' and does not start with a dot, so it is always one
plain file name inside that folder; files are written atomically without following links.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from ovdet.errors import OVDetError
from ovdet.service.settings import ServiceError
from ovdet.util.env import home
from ovdet.util.safeio import atomic_write, read_no_follow

__all__ = ["NAME_PATTERN", "VocabularyStore", "check_name"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """`name` if it is a valid vocabulary name; ServiceError 400 otherwise."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ServiceError(400, "bad_vocabulary_name",
                           f"{str(name)[:80]!r} is not a vocabulary name: use 1-64 letters, digits, '.', '_' or '-', "
                           "not starting with '.'")
    return name


class VocabularyStore:
    """name -> {"classes": ..., "version": n}; `folder` None keeps them in memory only. Thread-safe.

    A persisted store reads through its folder: a file another process wrote, changed or deleted there (another
    replica of `ovdet serve --ray` on this machine, or a person) is what `get` and `names` answer; each change of a
    file gives its vocabulary a new version, so batches never mix the old and the new classes.
    """

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._items: dict[str, dict[str, Any]] = {}
        self._stamps: dict[str, tuple[int, int, int]] = {}  # name -> (inode, size, mtime_ns) of the file read
        self._lock = threading.Lock()
        self._counter = 0
        if folder is not None:
            self.names()  # a broken file is reported when the server starts

    @classmethod
    def default(cls, persist: bool) -> VocabularyStore:
        """The store under $OVDET_HOME/vocabularies (persist), or one in memory."""
        return cls(home() / "vocabularies" if persist else None)

    def _sync(self, name: str) -> None:
        """Bring `name` in line with its file (caller holds the lock; persisted stores only)."""
        path = self.folder / f"{name}.json"
        try:
            st = path.lstat()
        except OSError:
            self._items.pop(name, None)
            self._stamps.pop(name, None)
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._stamps.get(name) == stamp and name in self._items:
            return
        try:
            record = json.loads(read_no_follow(path, "a stored vocabulary"))
        except (OSError, ValueError, OVDetError) as exc:
            raise ServiceError(500, "bad_vocabulary_file",
                               f"{path}: not a readable vocabulary ({exc}); fix or delete it") from None
        if not isinstance(record, dict) or "classes" not in record:
            self._items.pop(name, None)
            self._stamps.pop(name, None)
            return
        self._counter += 1
        self._items[name] = {"classes": record["classes"], "version": self._counter}
        self._stamps[name] = stamp

    def put(self, name: str, classes: Any) -> dict[str, Any]:
        """Store (or replace) `name`; the caller has checked `classes` parses. Returns the stored record."""
        check_name(name)
        with self._lock:
            self._counter += 1
            record = {"classes": classes, "version": self._counter}
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"{name}.json"
                atomic_write(path, json.dumps({"classes": classes}, ensure_ascii=False), root=self.folder)
                st = path.lstat()
                self._stamps[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
            self._items[name] = record
            return dict(record)

    def get(self, name: str) -> dict[str, Any]:
        """The record of `name`; ServiceError 404 when there is none."""
        check_name(name)
        with self._lock:
            if self.folder is not None:
                self._sync(name)
            if name not in self._items:
                raise ServiceError(404, "unknown_vocabulary",
                                   f"no vocabulary named {name!r}: store it first with PUT /v1/vocabularies/{name}")
            return dict(self._items[name])

    def delete(self, name: str) -> None:
        """Forget `name` (and its file); ServiceError 404 when there is none."""
        self.get(name)
        with self._lock:
            self._items.pop(name, None)
            self._stamps.pop(name, None)
            if self.folder is not None:
                (self.folder / f"{name}.json").unlink(missing_ok=True)

    def names(self) -> list[str]:
        with self._lock:
            if self.folder is not None:
                on_disk = {p.stem for p in self.folder.glob("*.json") if NAME_PATTERN.fullmatch(p.stem)} \
                    if self.folder.is_dir() else set()
                for name in on_disk | set(self._items):
                    self._sync(name)
            return sorted(self._items)
