"""Writers: dataset formats (COCO, YOLO + data.yaml, Pascal VOC, JSONL), annotated previews, atomic files.

Every file is written whole or not at all (temporary file + os.replace), except the JSONL journal,
which is append-only: each record is one line sent with a single write(), and a torn last line (power
loss) is cut off by `repair_journal` before the journal is read or appended again (one that fails on a
full disk is cut back at once). The formats follow
supervision's dataset conventions (1-based COCO categories, 1-based VOC pixel boxes, 5-decimal YOLO
lines) and load with its loaders; this module adds streaming and crash safety: nothing here holds more
than one image's detections in memory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape

import cv2
import numpy as np
import supervision as sv
import yaml
from supervision.dataset.formats.coco import classes_to_coco_categories

from ovdet.draw import draw
from ovdet.errors import DatasetError
from ovdet.splits import ValSplit

__all__ = [
    "FORMATS",
    "CocoWriter",
    "ImageRecord",
    "Journal",
    "PreviewWriter",
    "VocWriter",
    "YoloWriter",
    "atomic_link",
    "atomic_open",
    "atomic_write",
    "open_dataset_writers",
    "parse_formats",
    "read_journal",
    "rebuild_from_journal",
    "remove_stale_temp_files",
    "repair_journal",
]

# Dataset formats annotate can write.
FORMATS = ("coco", "yolo", "voc", "jsonl")

_TMP_SUFFIX = ".ovdet-tmp"
# A link that fails for these reasons fails as a copy too: report them instead of trying the next way.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file that becomes `path` when the block ends without error and is removed otherwise.

    Readers only ever see the old or the complete new file, and a write that fails (a full disk) leaves
    no partial file behind and gives its space back at once.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    """Remove the temporary file of a write that failed."""
    try:
        os.unlink(tmp)
    except OSError:
        pass  # never created, or its folder is gone; remove_stale_temp_files clears what a later run finds


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """"coco,yolo" or a list -> the distinct formats in order; DatasetError for unknown or none."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    fmts = tuple(dict.fromkeys(str(f).strip().lower() for f in items if str(f).strip()))
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown or not fmts:
        raise DatasetError(
            f"unknown output format {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(FORMATS)} (comma-separated)"
        )
    return fmts


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` so that readers only ever see the old or the complete new file."""
    with atomic_open(path, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_link(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Make `link` point at the file `target`: a symlink, else a hard link, else a copy; atomically."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}{_TMP_SUFFIX}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        try:
            os.symlink(os.path.abspath(target), tmp)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
            try:
                os.link(target, tmp)
            except OSError as exc2:
                if exc2.errno in _NO_ROOM:
                    raise
                shutil.copyfile(target, tmp)
        os.replace(tmp, link)
    except BaseException:
        _discard(tmp)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete temporary files a killed run left in `folder` (not recursive); returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX):
            os.unlink(entry.path)
            removed += 1
    return removed


@dataclass
class ImageRecord:
    """The result for one image: where it is, its output name, its size and its detections.

    `image` is the path relative to the input folder (POSIX separators), `key` the unique flat
    file stem used for per-image outputs, `boxes` xyxy pixel coordinates in the (EXIF-rotated)
    image, `class_ids`/`scores` one per box.
    """

    image: str
    path: str
    key: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @classmethod
    def from_detections(cls, image: str, path: str, key: str, shape: Sequence[int],
                        detections: sv.Detections) -> "ImageRecord":
        """Record for one image; boxes rounded to 0.01 px and scores to 1e-5 so every format agrees."""
        height, width = int(shape[0]), int(shape[1])
        boxes = np.round(np.asarray(detections.xyxy, np.float64), 2).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        scores = np.round(np.asarray(detections.confidence, np.float64), 5).reshape(-1)
        class_ids = np.asarray(detections.class_id, int).reshape(-1)
        return cls(image, path, key, width, height, boxes, class_ids, scores)

    def to_json(self, classes: Sequence[str]) -> dict[str, Any]:
        return {
            "image": self.image,
            "path": self.path,
            "key": self.key,
            "width": self.width,
            "height": self.height,
            "detections": [
                {"class_id": int(c), "class_name": classes[int(c)], "score": float(s),
                 "bbox": [float(v) for v in box]}
                for box, c, s in zip(self.boxes, self.class_ids, self.scores)
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ImageRecord":
        """From a journal line (see `checked_record`: its key names output files)."""
        dets = checked_record(d)["detections"]
        return cls(
            d["image"], d["path"], d["key"], int(d["width"]), int(d["height"]),
            np.array([x["bbox"] for x in dets], np.float64).reshape(-1, 4),
            np.array([x["class_id"] for x in dets], int),
            np.array([x["score"] for x in dets], np.float64),
        )

    def detections(self, classes: Sequence[str]) -> sv.Detections:
        """These results as supervision Detections (with data["class_name"])."""
        names = np.array([classes[c] for c in self.class_ids], dtype=object).astype(str)
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32).reshape(-1, 4),
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

    Raises DatasetError when a line other than the last one is damaged: that is not a crash artefact.
    """
    path = Path(path)
    if not path.exists():
        return 0
    good_end, count, bad_at = 0, 0, None
    with open(path, "rb") as fh:
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
        os.truncate(path, good_end)
    return count


def read_journal(path: str | os.PathLike, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of a (repaired) JSONL journal, stopping at byte offset `end` if given."""
    with open(path, "rb") as fh:
        pos = 0
        for line in fh:
            pos += len(line)
            if end is not None and pos > end:
                return
            yield checked_record(json.loads(line))


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


def real_dir(folder: Path) -> Path:
    """Create `folder` (and parents); refuse one that is a symbolic link, so that every file a writer puts in it
    stays inside the output folder instead of landing wherever the link points."""
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink():
        raise DatasetError(f"{folder} is a symbolic link (to {os.readlink(folder)}): ovdet writes only inside the "
                           "output folder. Remove the link, or choose another output folder.")
    return folder


class Journal:
    """Append-only JSONL file: one record per line, each line one write() (whole after a kill -9)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_symlink():
            raise DatasetError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}): ovdet appends only to "
                               "its own journal inside the output folder. Remove the link.")
        # O_NOFOLLOW: a link made after the check above fails instead of being followed
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
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


# ----------------------------------------------------------------------------- per-image formats


class YoloWriter:
    """Ultralytics layout: images/ (links to the originals), labels/ (one txt each), data.yaml.

    `data.yaml` names the folder by absolute path, so `YOLO(...).train(data=".../data.yaml")` works
    unchanged. With an active `split` it points train and val at train.txt / val.txt (rebuilt from the
    journal); without, both at images/ (the whole set), and a comment in it says so.
    """

    def __init__(self, root: str | os.PathLike, classes: Sequence[str], split: ValSplit | None = None):
        self.root = Path(root)
        self.classes = list(classes)
        self.split = split or ValSplit()
        self.images = self.root / "images"
        self.labels = self.root / "labels"
        self.data_yaml = self.root / "data.yaml"

    def start(self) -> None:
        for folder in (self.root, self.images, self.labels):
            real_dir(folder)
        for folder in (self.root, self.images, self.labels):
            remove_stale_temp_files(folder)
        if self.split.active:
            note = (f"# train/val: {self.split.fraction:g} of the images held out for validation by a hash of their "
                    f"path (seed {self.split.seed}),\n# so every re-run and resume puts each image in the same split. "
                    "train.txt and val.txt list them.\n")
            train, val = "train.txt", "val.txt"
        else:
            note = ("# val = train: no images were held out, so validation scores are measured on the training "
                    "images.\n# Annotate with --val-split 0.2 (for example) to hold out a validation split.\n")
            train = val = "images"
        data = {"path": str(self.root.resolve()), "train": train, "val": val, "nc": len(self.classes),
                "names": dict(enumerate(self.classes))}
        atomic_write(self.data_yaml, note + yaml.safe_dump(data, allow_unicode=True, sort_keys=False))

    def rebuild(self, journal: str | os.PathLike, end: int | None = None) -> None:
        """With a split: write train.txt and val.txt listing the images in `journal` (up to byte `end`)."""
        if not self.split.active:
            return
        with atomic_open(self.root / "train.txt", "w", encoding="utf-8") as train, \
                atomic_open(self.root / "val.txt", "w", encoding="utf-8") as val:
            for rec in read_journal(journal, end):
                fh = val if self.split.is_val(rec["image"]) else train
                fh.write(f"./images/{rec['key']}{Path(rec['image']).suffix}\n")

    def write(self, rec: ImageRecord) -> None:
        # supervision's detections_to_yolo_annotations writes the same lines, one numpy call per box (~25 us);
        # vectorised here because an image can carry hundreds of boxes.
        wh = np.array([rec.width, rec.height, rec.width, rec.height], np.float64)
        x1, y1, x2, y2 = (rec.boxes / wh).T
        rows = zip(rec.class_ids.tolist(), ((x1 + x2) / 2).tolist(), ((y1 + y2) / 2).tolist(),
                   (x2 - x1).tolist(), (y2 - y1).tolist())
        text = "".join(f"{c} {xc:.5f} {yc:.5f} {w:.5f} {h:.5f}\n" for c, xc, yc, w, h in rows)
        atomic_write(self.labels / f"{rec.key}.txt", text)
        atomic_link(rec.path, self.images / f"{rec.key}{rec.suffix}")


class VocWriter:
    """Pascal VOC layout: Annotations/ (one XML per image) and JPEGImages/ (links to the originals)."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str]):
        self.root = Path(root)
        self.classes = list(classes)
        self.annotations = self.root / "Annotations"
        self.images = self.root / "JPEGImages"

    def start(self) -> None:
        for folder in (self.annotations, self.images):
            real_dir(folder)
            remove_stale_temp_files(folder)

    def write(self, rec: ImageRecord) -> None:
        # The document supervision's detections_to_pascal_voc builds (same 1-based, rounded <bndbox>), from
        # a template: its minidom pretty-printer costs ~0.1 ms per box and an image can carry hundreds.
        objects = []
        for (x1, y1, x2, y2), c, score in zip(rec.boxes.tolist(), rec.class_ids.tolist(), rec.scores.tolist()):
            xmin, ymin = round(x1 + 1), round(y1 + 1)
            xmax, ymax = max(round(x2), xmin), max(round(y2), ymin)
            objects.append(_VOC_OBJECT.format(name=escape(self.classes[c]), score=score, xmin=xmin, ymin=ymin,
                                              xmax=xmax, ymax=ymax))
        xml = _VOC_ANNOTATION.format(filename=escape(f"{rec.key}{rec.suffix}"), path=escape(rec.path),
                                     width=rec.width, height=rec.height, objects="".join(objects))
        atomic_write(self.annotations / f"{rec.key}.xml", xml)
        atomic_link(rec.path, self.images / f"{rec.key}{rec.suffix}")


_VOC_ANNOTATION = """<annotation>
  <folder>JPEGImages</folder>
  <filename>{filename}</filename>
  <path>{path}</path>
  <source>
    <database>ovdet annotate</database>
  </source>
  <size>
    <width>{width}</width>
    <height>{height}</height>
    <depth>3</depth>
  </size>
  <segmented>0</segmented>
{objects}</annotation>
"""

_VOC_OBJECT = """  <object>
    <name>{name}</name>
    <pose>Unspecified</pose>
    <truncated>0</truncated>
    <difficult>0</difficult>
    <score>{score:.5f}</score>
    <bndbox>
      <xmin>{xmin}</xmin>
      <ymin>{ymin}</ymin>
      <xmax>{xmax}</xmax>
      <ymax>{ymax}</ymax>
    </bndbox>
  </object>
"""


class PreviewWriter:
    """Annotated JPEG copies (boxes and labels drawn with supervision) under one folder."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str], quality: int = 90):
        self.root = Path(root)
        self.classes = list(classes)
        self.quality = quality

    def start(self) -> None:
        real_dir(self.root)
        remove_stale_temp_files(self.root)

    def write(self, rec: ImageRecord, image: np.ndarray) -> None:
        ok, buf = cv2.imencode(".jpg", draw(image, rec.detections(self.classes)),
                               [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError(f"could not encode the annotated preview of {rec.path}")
        atomic_write(self.root / f"{rec.key}.jpg", buf.tobytes())


class CocoWriter:
    """COCO detection JSON rebuilt from the journal, streamed to a temporary file and swapped in.

    Image `file_name` is the path relative to the input folder; annotations carry `score`.
    Category ids are 1-based (class_id + 1), as supervision and the COCO tools expect. With an active
    `split`, train.json and val.json beside it hold the two splits (the main file keeps every image).
    """

    def __init__(self, path: str | os.PathLike, classes: Sequence[str], info: dict[str, Any] | None = None,
                 split: ValSplit | None = None):
        self.path = Path(path)
        self.classes = list(classes)
        self.info = info or {}
        self.split = split or ValSplit()

    def start(self) -> None:
        real_dir(self.path.parent)
        remove_stale_temp_files(self.path.parent)

    def rebuild(self, journal: str | os.PathLike, end: int | None = None) -> None:
        """Write the COCO file(s) for every record in `journal` (up to byte `end`)."""
        self._write(self.path, journal, end, None)
        if self.split.active:
            self._write(self.path.with_name("train.json"), journal, end, False)
            self._write(self.path.with_name("val.json"), journal, end, True)

    def _write(self, path: Path, journal: str | os.PathLike, end: int | None, val: bool | None) -> None:
        """One COCO file: all records (val None), or those of the val (True) or train (False) split."""
        def dump(obj: Any) -> str:
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

        def records() -> Iterator[dict[str, Any]]:
            return (r for r in read_journal(journal, end) if val is None or self.split.is_val(r["image"]) == val)

        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write('{"info":' + dump(self.info) + ',"licenses":[],"categories":'
                     + dump(classes_to_coco_categories(self.classes)) + ',\n"images":[')
            for image_id, rec in enumerate(records(), 1):
                entry = {"id": image_id, "file_name": rec["image"], "width": rec["width"], "height": rec["height"]}
                fh.write(("\n" if image_id == 1 else ",\n") + dump(entry))
            fh.write('],\n"annotations":[')
            # Same fields and 1-based category ids as supervision's detections_to_coco_annotations, plus
            # "score"; built from the journal's plain numbers (this runs over the whole run at each checkpoint).
            ann_id = 0
            for image_id, rec in enumerate(records(), 1):
                anns = []
                for d in rec["detections"]:
                    x1, y1, x2, y2 = d["bbox"]
                    w, h = round(x2 - x1, 2), round(y2 - y1, 2)
                    ann_id += 1
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": d["class_id"] + 1,
                                 "bbox": [x1, y1, w, h], "area": round(w * h, 2), "segmentation": [],
                                 "iscrowd": 0, "score": d["score"]})
                if anns:
                    fh.write(("\n" if anns[0]["id"] == 1 else ",\n") + dump(anns)[1:-1].replace("},{", "},\n{"))
            fh.write("]}\n")


def open_dataset_writers(root: str | os.PathLike, classes: Sequence[str], formats: Sequence[str],
                         info: dict[str, Any] | None = None, split: ValSplit | None = None,
                         ) -> tuple[list[YoloWriter | VocWriter], CocoWriter | None]:
    """The started per-image writers (YOLO, VOC) and the COCO writer that `formats` ask for, under `root`.

    `split` (a train/val split) applies to the YOLO and COCO outputs.
    """
    root = Path(root)
    writers: list[YoloWriter | VocWriter] = []
    if "yolo" in formats:
        writers.append(YoloWriter(root / "yolo", classes, split))
    if "voc" in formats:
        writers.append(VocWriter(root / "voc", classes))
    coco = CocoWriter(root / "coco" / "annotations.json", classes, info, split) if "coco" in formats else None
    for writer in [*writers, coco]:
        if writer is not None:
            writer.start()
    return writers, coco


def rebuild_from_journal(writers: Sequence[YoloWriter | VocWriter], coco: CocoWriter | None,
                         journal: str | os.PathLike, end: int | None = None) -> None:
    """Rewrite the files that cover the whole dataset (COCO files, YOLO split lists) from the journal."""
    for writer in writers:
        if isinstance(writer, YoloWriter):
            writer.rebuild(journal, end)
    if coco is not None:
        coco.rebuild(journal, end)
