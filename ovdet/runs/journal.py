"""Run records: `ImageRecord` (one image's results) and the append-only JSONL journal (predictions.jsonl, errors.jsonl).

Each record is one line sent with a single write(), so a kill -9 leaves whole lines; a torn last line (power loss)
is cut off by `repair_journal` before the journal is read or appended again (one that fails on a full disk is cut
back at once). A journal may come from someone else's run folder, so it is opened without following a link, a
line that is not JSON raises DatasetError, and `checked_image_record` vets every field ovdet reads from a record.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv

from ovdet.errors import DatasetError
from ovdet.masks.rle import DATA_KEY as MASK_RLE_KEY
from ovdet.masks.rle import encode, rle_problem
from ovdet.util.safeio import not_plain_file, open_no_follow

__all__ = ["ImageRecord", "Journal", "checked_image_record", "checked_record", "read_journal", "repair_journal"]


@dataclass
class ImageRecord:
    """The result for one image: where it is, its output name, its size and its detections.

    `image` is the path relative to the input folder (POSIX separators), `key` the unique flat
    file stem used for per-image outputs, `boxes` xyxy pixel coordinates in the (EXIF-rotated)
    image, `class_ids`/`scores` one per box, `masks` one COCO RLE per box (ovdet.masks.rle) or None when the run
    makes no masks (the journal's "segmentation").
    """

    image: str
    path: str
    key: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    masks: list[dict[str, Any]] | None = None

    @classmethod
    def from_detections(cls, image: str, path: str, key: str, shape: Sequence[int],
                        detections: sv.Detections) -> "ImageRecord":
        """Record for one image; boxes rounded to 0.01 px and scores to 1e-5 so every format agrees. Masks (RLEs in
        data["mask_rle"], else dense ones) become RLEs here."""
        height, width = int(shape[0]), int(shape[1])
        boxes = np.round(np.asarray(detections.xyxy, np.float64), 2).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        scores = np.round(np.asarray(detections.confidence, np.float64), 5).reshape(-1)
        class_ids = np.asarray(detections.class_id, int).reshape(-1)
        if MASK_RLE_KEY in detections.data:
            masks = [dict(r) for r in detections.data[MASK_RLE_KEY]]
        else:
            masks = None if detections.mask is None else [encode(m) for m in detections.mask]
        return cls(image, path, key, width, height, boxes, class_ids, scores, masks)

    def to_json(self, classes: Sequence[str]) -> dict[str, Any]:
        return {
            "image": self.image,
            "path": self.path,
            "key": self.key,
            "width": self.width,
            "height": self.height,
            "detections": [
                {"class_id": int(c), "class_name": classes[int(c)], "score": float(s),
                 "bbox": [float(v) for v in box], **({} if m is None else {"segmentation": m})}
                for box, c, s, m in zip(self.boxes, self.class_ids, self.scores,
                                        self.masks if self.masks is not None else [None] * len(self.boxes))
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], check: bool = True) -> "ImageRecord":
        """From a journal line, vetted by `checked_image_record` (its key names output files) unless `check` is False
        because it already was."""
        dets = (checked_image_record(d) if check else d)["detections"]
        return cls(
            d["image"], d["path"], d["key"], int(d["width"]), int(d["height"]),
            np.array([x["bbox"] for x in dets], np.float64).reshape(-1, 4),
            np.array([x["class_id"] for x in dets], int),
            np.array([x["score"] for x in dets], np.float64),
            [x["segmentation"] for x in dets] if dets and all("segmentation" in x for x in dets) else None,
        )

    def detections(self, classes: Sequence[str]) -> sv.Detections:
        """These results as supervision Detections (with data["class_name"], and dense masks when it has masks)."""
        from ovdet.masks.rle import decode

        names = np.array([classes[c] for c in self.class_ids], dtype=object).astype(str)
        masks = None
        if self.masks is not None:
            masks = np.stack([decode(m) for m in self.masks]) if self.masks else \
                np.zeros((0, self.height, self.width), bool)
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32).reshape(-1, 4),
            mask=masks,
            confidence=self.scores.astype(np.float32),
            class_id=self.class_ids.astype(int),
            data={"class_name": names},
        )

    @property
    def suffix(self) -> str:
        return Path(self.image).suffix


# ----------------------------------------------------------------------------- JSONL journal


def repair_journal(path: str | os.PathLike) -> int:
    """Cut a torn (incomplete or unparsable) last line off a JSONL journal; returns the record count.

    Raises DatasetError when a line other than the last one is damaged (that is not a crash artefact), and before
    anything is cut when the journal is not a plain file of its own (a link, a hard link, a FIFO).
    """
    path = Path(path)
    try:
        fh = open_no_follow(path, "the journal")
    except FileNotFoundError:
        return 0
    good_end, count, bad_at = 0, 0, None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if bad_at is not None:
                raise DatasetError(
                    f"{path}: line {bad_at} is damaged; this is not a run that was merely interrupted. "
                    "Start over with --overwrite (or another --out folder)."
                )
            ok = line.endswith(b"\n")
            if ok:
                try:
                    json.loads(line)
                except ValueError:
                    ok = False
            if ok:
                good_end += len(line)
                count += 1
            else:
                bad_at = lineno
        if bad_at is not None:
            _cut(path, fh.fileno(), good_end)
    return count


def _cut(path: Path, read_fd: int, size: int) -> None:
    """Truncate the journal open as `read_fd` to `size` bytes, through a second no-follow open of the same file."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not os.path.samestat(st, os.fstat(read_fd)) or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise not_plain_file(path, "the journal")
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def read_journal(path: str | os.PathLike, end: int | None = None, check: Any = None) -> Iterator[dict[str, Any]]:
    """Yield the records of a (repaired) JSONL journal, stopping at byte offset `end` if given.

    `check(record)` (default: checked_record) vets each record. The journal must be a plain file (no link is
    followed); a line that is not JSON raises DatasetError naming it.
    """
    check = checked_record if check is None else check
    with open_no_follow(path, "a journal") as fh:
        pos = 0
        for lineno, line in enumerate(fh, 1):
            pos += len(line)
            if end is not None and pos > end:
                return
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise DatasetError(f"{path}: line {lineno} is not a JSON record ({exc}); this journal was damaged "
                                   "or edited. Run the job that wrote it again.") from None
            yield check(record)


def checked_record(d: Any) -> Any:
    """A journal record whose `key` (the stem of the output files written for it) is a plain file name: a journal
    edited by hand or by another program must not make ovdet write outside the output folder."""
    key = d.get("key", "") if isinstance(d, dict) else ""
    if isinstance(d, dict) and "key" in d and (not isinstance(key, str) or not key or key in (".", "..")
                                               or any(c in key for c in "/\\\0")):
        raise DatasetError(f"Journal record for {d.get('image')!r} has key {key!r}, which is not a plain file name: "
                           "output files are named after it, so it could write outside the output folder. This "
                           "journal was not written by ovdet annotate; annotate the images again.")
    return d


def checked_image_record(d: Any, num_classes: int | None = None) -> dict[str, Any]:
    """A predictions.jsonl record with every field ovdet reads of the type and range annotate writes.

    DatasetError, naming the field, for anything else (`num_classes`: class ids must be below it), so that a
    damaged or foreign journal is refused with a message instead of failing somewhere in a writer.
    """
    checked_record(d)
    problem = _image_record_problem(d, num_classes)
    if problem:
        image = d.get("image") if isinstance(d, dict) else None
        raise DatasetError(f"Journal record for {image!r}: {problem}. This is not a record ovdet annotate writes "
                           "(damaged or edited); run the job that wrote the folder again.")
    return d


def _file_name_text(text: str) -> bool:
    """Whether `text` can be part of a file name (no NUL) and of a UTF-8 line (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeError:
        return False
    return "\0" not in text


_BIG = 1 << 53  # beyond this an integer is no pixel coordinate (and a huge one cannot even become a float)


def _finite(v: Any) -> bool:
    """A JSON number that is a finite float (NaN and infinities fail v - v == 0) or a modest integer; not a bool."""
    t = type(v)
    return (t is float and v - v == 0.0) or (t is int and -_BIG < v < _BIG)


def _image_record_problem(d: Any, num_classes: int | None) -> str:
    if not isinstance(d, dict):
        return "not a JSON object"
    for name in ("image", "path", "key"):
        if not isinstance(d.get(name), str) or not d[name] or not _file_name_text(d[name]):
            return f"{name!r} is not a non-empty string that can name a file"
    if len((d["key"] + Path(d["image"]).suffix).encode("utf-8")) > 250:
        return "'key' is too long for a file name"
    for name in ("width", "height"):
        v = d.get(name)
        if type(v) is not int or not 0 < v < 1 << 31:
            return f"{name!r} is not a positive whole number"
    top = _BIG if num_classes is None else num_classes
    for field_name, scored in (("detections", True), ("gt", False)):
        boxes = d.get(field_name, None if scored else [])  # every record has detections; eval records add gt
        if type(boxes) is not list:
            return f"{field_name!r} is not a list"
        for box in boxes:  # a hot loop (COCO rebuilds read the whole journal): plain type() tests
            c = box.get("class_id") if type(box) is dict else None
            if type(c) is not int or not 0 <= c < top:
                return f"a {field_name!r} entry has no valid class_id (0..{top - 1})"
            if scored:
                score = box.get("score")
                if not (_finite(score) and 0 <= score <= 1):
                    return f"a {field_name!r} entry has a score that is not a number between 0 and 1"
            bbox = box.get("bbox")
            if type(bbox) is not list or len(bbox) != 4 or not (_finite(bbox[0]) and _finite(bbox[1])
                                                                 and _finite(bbox[2]) and _finite(bbox[3])):
                return f"a {field_name!r} entry has a bbox that is not 4 finite numbers"
            if "segmentation" in box:
                problem = rle_problem(box["segmentation"], d["height"], d["width"])
                if problem:
                    return f"a {field_name!r} entry's segmentation {problem}"
    return ""


class Journal:
    """Append-only JSONL file: one record per line, each line one write() (whole after a kill -9)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # never appended through a link, into a hard link's other names or into a FIFO: refused, not followed
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                               | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise not_plain_file(self.path, "a journal") from None
            raise
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(self._fd)
            raise not_plain_file(self.path, "a journal")
        self._end = os.fstat(self._fd).st_size  # end of the last whole record (one writer: the folder is locked)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record; if the disk fills during the write, the journal is cut back to its last whole line."""
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # a full disk takes part of the line: never leave half a line behind
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)", str(self.path))
        except BaseException:
            os.ftruncate(self._fd, self._end)
            raise
        self._end += written

    def sync(self) -> None:
        """Flush to the storage device (survives power loss, not only process death)."""
        os.fsync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
