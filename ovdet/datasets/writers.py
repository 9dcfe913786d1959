"""Writers: dataset formats (COCO, YOLO + data.yaml, Pascal VOC, JSONL) and annotated previews.

Every file is written whole or not at all (temporary file + os.replace) and never through a link: each write
opens its folder link-free below the output folder (ovdet.util.safeio, whose atomic_open / atomic_write / atomic_link
and remove_stale_temp_files this module re-exports). The JSONL journal and ImageRecord live in ovdet.runs.journal
(re-exported here too). The formats follow
supervision's dataset conventions (1-based COCO categories, 1-based VOC pixel boxes, 5-decimal YOLO
lines) and load with its loaders; this module adds streaming and crash safety: nothing here holds more
than one image's detections in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import cv2
import numpy as np
import yaml
from supervision.dataset.formats.coco import classes_to_coco_categories

from ovdet.util.display import shown
from ovdet.media.draw import draw
from ovdet.errors import DatasetError
# the dataset formats annotate can write (defined in ovdet.options, so that the CLI parser needs no OpenCV)
from ovdet.options import DATASET_FORMATS as FORMATS
from ovdet.runs.journal import (
    ImageRecord,
    Journal,
    checked_image_record,
    checked_record,
    read_journal,
    repair_journal,
)
from ovdet.util.safeio import (
    atomic_link,
    atomic_open,
    atomic_write,
    ensure_dir,
    remove_stale_temp_files,
)
from ovdet.datasets.splits import ValSplit

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
    "checked_image_record",
    "checked_record",
    "open_dataset_writers",
    "parse_formats",
    "read_journal",
    "real_dir",
    "rebuild_from_journal",
    "remove_stale_temp_files",
    "repair_journal",
]


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


def real_dir(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Create `folder` and the folders between it and `root` (default: its parent); refuse any that is a symbolic
    link, so that every file a writer puts in it stays inside the output folder."""
    return ensure_dir(folder, root)


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
        self.base = self.root.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        for folder in (self.root, self.images, self.labels):
            real_dir(folder, self.base)
        for folder in (self.root, self.images, self.labels):
            remove_stale_temp_files(folder, self.base)
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
        atomic_write(self.data_yaml, note + yaml.safe_dump(data, allow_unicode=True, sort_keys=False), root=self.base)

    def rebuild(self, journal: str | os.PathLike, end: int | None = None) -> None:
        """With a split: write train.txt and val.txt listing the images in `journal` (up to byte `end`)."""
        if not self.split.active:
            return
        with atomic_open(self.root / "train.txt", "w", root=self.base, encoding="utf-8") as train, \
                atomic_open(self.root / "val.txt", "w", root=self.base, encoding="utf-8") as val:
            for rec in read_journal(journal, end, lambda d: checked_image_record(d, len(self.classes))):
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
        atomic_write(self.labels / f"{rec.key}.txt", text, root=self.base)
        atomic_link(rec.path, self.images / f"{rec.key}{rec.suffix}", root=self.base)


class VocWriter:
    """Pascal VOC layout: Annotations/ (one XML per image) and JPEGImages/ (links to the originals)."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str]):
        self.root = Path(root)
        self.classes = list(classes)
        self.annotations = self.root / "Annotations"
        self.images = self.root / "JPEGImages"
        self.base = self.root.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        for folder in (self.annotations, self.images):
            real_dir(folder, self.base)
            remove_stale_temp_files(folder, self.base)

    def write(self, rec: ImageRecord) -> None:
        # The document supervision's detections_to_pascal_voc builds (same 1-based, rounded <bndbox>), from
        # a template: its minidom pretty-printer costs ~0.1 ms per box and an image can carry hundreds.
        objects = []
        for (x1, y1, x2, y2), c, score in zip(rec.boxes.tolist(), rec.class_ids.tolist(), rec.scores.tolist()):
            xmin, ymin = round(x1 + 1), round(y1 + 1)
            xmax, ymax = max(round(x2), xmin), max(round(y2), ymin)
            objects.append(_VOC_OBJECT.format(name=escape(self.classes[c]), score=score, xmin=xmin, ymin=ymin,
                                              xmax=xmax, ymax=ymax))
        # XML 1.0 has no control characters: the path is shown escaped (keys are already plain)
        xml = _VOC_ANNOTATION.format(filename=escape(f"{rec.key}{rec.suffix}"), path=escape(shown(rec.path)),
                                     width=rec.width, height=rec.height, objects="".join(objects))
        atomic_write(self.annotations / f"{rec.key}.xml", xml, root=self.base)
        atomic_link(rec.path, self.images / f"{rec.key}{rec.suffix}", root=self.base)


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
        self.base = self.root.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        real_dir(self.root, self.base)
        remove_stale_temp_files(self.root, self.base)

    def write(self, rec: ImageRecord, image: np.ndarray) -> None:
        ok, buf = cv2.imencode(".jpg", draw(image, rec.detections(self.classes)),
                               [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError(f"could not encode the annotated preview of {rec.path}")
        atomic_write(self.root / f"{rec.key}.jpg", buf.tobytes(), root=self.base)


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
        self.base = self.path.parent.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        real_dir(self.path.parent, self.base)
        remove_stale_temp_files(self.path.parent, self.base)

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

        def records(check: Any) -> Iterator[dict[str, Any]]:
            return (r for r in read_journal(journal, end, check) if val is None or self.split.is_val(r["image"]) == val)

        k = len(self.classes)

        with atomic_open(path, "w", root=self.base, encoding="utf-8") as fh:
            fh.write('{"info":' + dump(self.info) + ',"licenses":[],"categories":'
                     + dump(classes_to_coco_categories(self.classes)) + ',\n"images":[')
            for image_id, rec in enumerate(records(lambda d: checked_image_record(d, k)), 1):  # every field vetted
                entry = {"id": image_id, "file_name": rec["image"], "width": rec["width"], "height": rec["height"]}
                fh.write(("\n" if image_id == 1 else ",\n") + dump(entry))
            fh.write('],\n"annotations":[')
            # Same fields and 1-based category ids as supervision's detections_to_coco_annotations, plus
            # "score"; built from the journal's plain numbers (this runs over the whole run at each checkpoint).
            ann_id = 0
            for image_id, rec in enumerate(records(checked_record), 1):  # the same bytes, vetted by the first pass
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
