"""Run folders: the names of the files a run writes (run.json, predictions.jsonl, errors.jsonl) and reading them back.

`ovdet annotate`, `ovdet eval --out` and `ovdet relabel` write run folders; `ovdet report` and `ovdet relabel`
read them without the model. A run's per-class floor is the lowest score it kept for that class: its class's own
threshold from the class spec, else the run's `conf`; boxes under it were never saved, so no later step can go lower.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovdet.errors import DatasetError
from ovdet.sinks import read_journal

__all__ = ["ERRORS", "JOURNAL", "MANIFEST", "OUTPUTS", "RunFolder", "clear_outputs", "error_record", "load_run"]

MANIFEST = "run.json"
JOURNAL = "predictions.jsonl"
ERRORS = "errors.jsonl"
# Everything a run (and a report of it) writes in its folder: what --overwrite removes, and nothing else.
OUTPUTS = (MANIFEST, JOURNAL, ERRORS, "coco", "yolo", "voc", "annotated", "thumbs", "report.html",
           "originals", ".ovdet-ray")  # the last two: the Ray engine's copies of object-store images, its part files


def error_record(image: str, path: str, error: BaseException, named: str | os.PathLike | None = None) -> dict[str, str]:
    """The errors.jsonl record of an unreadable file: its path relative to the input, its full path, the reason.

    `named` is the name the error message starts with, if not `path`; the record drops it (path has its own key).
    """
    reason, prefix = str(error), f"{path if named is None else named}: "
    return {"image": image, "path": path, "reason": reason[len(prefix):] if reason.startswith(prefix) else reason}


def clear_outputs(folder: str | os.PathLike) -> None:
    """Delete the files and folders named in OUTPUTS from `folder` (links are removed, not followed)."""
    for name in OUTPUTS:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@dataclass
class RunFolder:
    """What a run folder says about itself: its settings, class names and per-class score floors."""

    path: Path
    kind: str  # "annotate", "eval" or "relabel"
    settings: dict[str, Any]
    names: list[str]
    floors: list[float]
    manifest: dict[str, Any]

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    @property
    def formats(self) -> list[str]:
        return list(self.settings.get("formats") or ["jsonl"])

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete image record of predictions.jsonl, in the order the run wrote them.

        Read-only: a run still writing (or killed mid-line) may end in a partial line, which is left alone.
        """
        return read_journal(self.journal, end=_complete_end(self.journal))

    def errors(self) -> list[dict[str, Any]]:
        """The files the run skipped: image, path and reason."""
        path = self.path / ERRORS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_run(path: str | os.PathLike) -> RunFolder:
    """Read run.json of a run folder and check its predictions.jsonl is there (a torn last line is cut off).

    Raises DatasetError, saying what to do, for a folder that is not a finished-or-interrupted ovdet run.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder; give the --out folder of an `ovdet annotate` (or eval) run")
    if not manifest_path.exists() or not (path / JOURNAL).exists():
        raise DatasetError(f"{path}: holds no {MANIFEST} and {JOURNAL}, so it is not an ovdet run folder; give the "
                           "--out folder of `ovdet annotate` or `ovdet eval --out`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        settings = manifest["settings"]
        entries = settings["classes"]["classes"]
        names = [str(c["name"]) for c in entries]
        conf = float(settings["conf"])
        floors = [conf if c.get("conf") is None else float(c["conf"]) for c in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{manifest_path}: unreadable or not written by ovdet ({exc}); re-run the job that "
                           "made this folder") from exc
    return RunFolder(path, str(manifest.get("kind", "annotate")), settings, names, floors, manifest)


def _complete_end(path: Path) -> int:
    """Byte offset just past the last newline of `path` (0 if none): the end of its complete lines."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0
