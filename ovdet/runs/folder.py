"""Run folders: the names of the files a run writes (run.json, predictions.jsonl, errors.jsonl) and reading them back.

`ovdet annotate`, `ovdet eval --out` and `ovdet relabel` write run folders; `ovdet report` and `ovdet relabel`
read them without the model. A run's per-class floor is the lowest score it kept for that class: its class's own
threshold from the class spec, else the run's `conf`; boxes under it were never saved, so no later step can go lower.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovdet.errors import DatasetError
from ovdet.runs.journal import checked_image_record, read_journal
from ovdet.runs.lock import LOCK_NAME
from ovdet.util.display import shown
from ovdet.util.safeio import open_no_follow, read_no_follow
from ovdet.media.sources import IMAGE_EXTENSIONS

__all__ = ["ERRORS", "JOURNAL", "KINDS", "MANIFEST", "ORIGINALS", "OUTPUTS", "RunFolder", "check_output_folder",
           "clear_outputs", "error_record", "load_run"]

MANIFEST = "run.json"
JOURNAL = "predictions.jsonl"
ERRORS = "errors.jsonl"
KINDS = ("annotate", "eval", "relabel")  # the run folders ovdet writes (run.json's "kind"; none: annotate)
ORIGINALS = "originals"  # the Ray engine's copies of object-store images (the records' paths point at them)
# Everything a run (and a report of it) writes in its folder: what --overwrite removes, and nothing else.
OUTPUTS = (MANIFEST, JOURNAL, ERRORS, "coco", "yolo", "voc", "annotated", "thumbs", "report.html",
           ORIGINALS, ".ovdet-ray")  # the last two: the Ray engine's copies of object-store images, its part files


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


def check_output_folder(out: str | os.PathLike, run: str = "", remedy: str = "") -> None:
    """Refuse `out` as a job's output folder when it is a file, or a folder that holds files but no ovdet run
    (run.json): the job would mix its files with someone else's, and --overwrite removes only ovdet's own.

    `run` names the kind of run in the message ("annotate "), `remedy` is added to its advice. A new folder, an
    empty one (the job's lock file aside) and an earlier run's folder pass; whether that run may be resumed or
    replaced is the job's to decide.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{shown(out)}: output path exists and is a file; choose a folder for --out")
    if out.is_dir() and not (out / MANIFEST).exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise DatasetError(f"{shown(out)}: folder is not empty and holds no ovdet {run}run; choose an empty or new "
                           f"--out folder{remedy}")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class RunFolder:
    """What a run folder says about itself: its settings, class names and per-class score floors."""

    path: Path
    kind: str  # "annotate", "eval" or "relabel"
    settings: dict[str, Any]
    names: list[str]
    floors: list[float]
    manifest: dict[str, Any]
    _real_dirs: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _roots: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    @property
    def formats(self) -> list[str]:
        return list(self.settings.get("formats") or ["jsonl"])

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete image record of predictions.jsonl, in the order the run wrote them, each checked field by
        field (DatasetError for one that annotate would not write).

        Read-only: a run still writing (or killed mid-line) may end in a partial line, which is left alone.
        """
        k = len(self.names)
        return read_journal(self.journal, end=_complete_end(self.journal),
                            check=lambda d: checked_image_record(d, k))

    def errors(self) -> list[dict[str, str]]:
        """The files the run skipped: image, path and reason (a torn last line, from a run killed mid-write, is left
        out; any other line that is not such a record raises DatasetError)."""
        path = self.path / ERRORS
        try:
            data = read_no_follow(path, "the run's errors.jsonl")
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        records = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                if lineno == len(lines):  # no newline after it: torn by a kill, not damaged
                    continue
                rec = None
            if not isinstance(rec, dict) or not _utf8(rec) or not all(isinstance(rec.get(k, ""), str)
                                                                      for k in ("image", "path", "reason")):
                raise DatasetError(f"{path}: line {lineno} is not an error record (image, path, reason); the file "
                                   "was damaged or edited. Run the job that wrote the folder again.")
            records.append({k: rec.get(k, "?" if k != "reason" else "") for k in ("image", "path", "reason")})
        return records

    def source_roots(self) -> list[str]:
        """The folders (real paths) whose image files this run's records may name: the source folder run.json
        records (an eval run: its images' common folder, else its data file's folder) and OUT/originals (the Ray
        engine's copies), each only if it is not a link into the run folder itself."""
        if self._roots is not None:
            return list(self._roots)
        run = os.path.realpath(self.path)
        given = self.settings.get("source")
        if not isinstance(given, str) and self.kind == "eval" and isinstance(self.settings.get("data"), str):
            given = os.path.dirname(self.settings["data"])
        roots = []
        if isinstance(given, str) and os.path.isabs(given) and "\0" not in given:
            real = os.path.realpath(given)
            if not _inside(real, run):
                roots.append(real)
        originals = os.path.join(run, ORIGINALS)
        if os.path.realpath(self.path / ORIGINALS) == originals:
            roots.append(originals)
        self._roots = roots
        return list(roots)

    def image_problem(self, path: str) -> str:
        """Why the image file `path` (a record's path) must not be linked, copied or thumbnailed; "" if it may.

        It may when it is a regular file with an image suffix in a folder inside one of `source_roots()`. A link as
        the file itself is followed only outside the run folder (links in the run folder came with it).
        """
        roots = self.source_roots()
        run = os.path.realpath(self.path)
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            return f"{path!r} is not an absolute file path; not used"
        name = os.path.normpath(path)
        where = " or ".join(roots) or "(none: run.json records no local source folder)"
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            return f"{path} is not an image file name; only images in the run's source folder {where} are used"
        parent = os.path.dirname(name)
        folder = self._real_dirs.get(parent)
        if folder is None:
            folder = self._real_dirs[parent] = os.path.realpath(parent)
        if not any(_inside(folder, root) for root in roots):
            return (f"{path} is outside the source folder recorded in run.json ({where}); not linked, copied or "
                    "shown: a run folder from elsewhere may name any file")
        try:
            st = os.lstat(name)
            if stat.S_ISLNK(st.st_mode):
                if _inside(folder, run) or _inside(os.path.realpath(name), run):
                    return f"{path} is a symbolic link inside the run folder, not an image of the source folder {where}"
                st = os.stat(name)
        except OSError as exc:
            return f"{path} cannot be used ({exc.strerror}); only existing images in the source folder {where} are"
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file; only images in the source folder {where} are used"
        return ""


def _utf8(doc: Any) -> bool:
    """Whether parsed JSON `doc` can be written back as UTF-8 (JSON's \\ud800 escapes parse to unwritable text)."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_manifest(path: Path, problem: str) -> DatasetError:
    return DatasetError(f"{path}: {problem}, so it was not written by ovdet (or was damaged or edited); re-run the "
                        "job that made this folder")


def _score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _check_manifest(manifest: Any, path: Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """run.json's kind, settings and class entries, each of the type ovdet writes; DatasetError otherwise."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise _bad_manifest(path, "holds no settings object")
    kind, settings = manifest.get("kind", "annotate"), manifest["settings"]
    if kind not in KINDS:
        raise _bad_manifest(path, f"names the kind of run {kind!r}, which is none of {', '.join(KINDS)}")
    classes = settings.get("classes")
    entries = classes.get("classes") if isinstance(classes, dict) else None
    if not isinstance(entries, list) or not entries:
        raise _bad_manifest(path, "lists no classes")
    for c in entries:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise _bad_manifest(path, f"has a class entry without a name: {c!r}")
        if c.get("conf") is not None and not _score(c["conf"]):
            raise _bad_manifest(path, f"gives class {c['name']!r} a threshold that is not a number between 0 and 1")
        prompts = c.get("prompts", [])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise _bad_manifest(path, f"gives class {c['name']!r} prompts that are not a list of strings")
    if not _score(settings.get("conf")):
        raise _bad_manifest(path, "has a conf that is not a number between 0 and 1")
    formats = settings.get("formats")
    if formats is not None and (not isinstance(formats, list) or not all(isinstance(f, str) for f in formats)):
        raise _bad_manifest(path, "has formats that are not a list of names")
    split = settings.get("val_split", 0.0)
    if not (_score(split) and split < 1) or not isinstance(settings.get("split_seed", 0), int):
        raise _bad_manifest(path, "has a val_split or split_seed that is not a fraction and a whole number")
    return kind, settings, entries


def load_run(path: str | os.PathLike) -> RunFolder:
    """Read run.json of a run folder and check its predictions.jsonl is there.

    Raises DatasetError, saying what to do, for a folder that is not a finished-or-interrupted ovdet run, and for
    a run.json or predictions.jsonl that is not a plain file of its own (a link is never followed).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder; give the --out folder of an `ovdet annotate` (or eval) run")
    if not os.path.lexists(manifest_path) or not os.path.lexists(path / JOURNAL):
        raise DatasetError(f"{path}: holds no {MANIFEST} and {JOURNAL}, so it is not an ovdet run folder; give the "
                           "--out folder of `ovdet annotate` or `ovdet eval --out`")
    open_no_follow(path / JOURNAL, "the run's journal").close()
    try:
        manifest = json.loads(read_no_follow(manifest_path, "the run's run.json"))
    except (ValueError, RecursionError) as exc:
        raise _bad_manifest(manifest_path, f"is not JSON ({exc})") from None
    if not _utf8(manifest):
        raise _bad_manifest(manifest_path, "holds text that is not valid Unicode (a lone surrogate escape)")
    kind, settings, entries = _check_manifest(manifest, manifest_path)
    names = [c["name"] for c in entries]
    conf = float(settings["conf"])
    floors = [conf if c.get("conf") is None else float(c["conf"]) for c in entries]
    return RunFolder(path, kind, settings, names, floors, manifest)


def _complete_end(path: Path) -> int:
    """Byte offset just past the last newline of `path` (0 if none): the end of its complete lines."""
    with open_no_follow(path, "the run's journal") as fh:
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
