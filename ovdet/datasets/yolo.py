"""YOLO dataset writer: the Ultralytics layout, one label file per image, trainable with `YOLO(...).train(data=...)`.

On disk, under OUT/yolo/:

    data.yaml          path (absolute), train, val, nc, names; a comment says how train and val were chosen
    images/KEY.EXT     the original image (a symbolic link, else a hard link, else a copy)
    labels/KEY.txt     one line per box: "class x_center y_center width height", normalised to 0..1, 5 decimals;
                       with --masks a segment label instead: "class x1 y1 x2 y2 ...", the outline of the box's mask
                       along pixel edges, so its extent (the box ultralytics takes) is the mask's box (6 decimals;
                       ovdet.masks.rle.mask_polygon), or the box's corners when its mask is empty. The same data.yaml
                       trains a segment model (yolo11n-seg.pt ...)
    train.txt, val.txt with a val split only: one "./images/KEY.EXT" per line, rebuilt from the journal

KEY is the image's flat output stem (ovdet.datasets.keys). Every file is replaced whole (ovdet.util.safeio) and no
link below the output folder is followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from ovdet.datasets.splits import ValSplit
from ovdet.masks.rle import decode, mask_polygon, yolo_segment
from ovdet.runs.journal import ImageRecord, checked_image_record, read_journal
from ovdet.util.safeio import atomic_link, atomic_open, atomic_write, ensure_dir, remove_stale_temp_files

__all__ = ["YoloWriter"]


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
            ensure_dir(folder, self.base)
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
        text = self._box_lines(rec) if rec.masks is None else self._segment_lines(rec)
        atomic_write(self.labels / f"{rec.key}.txt", text, root=self.base)
        atomic_link(rec.path, self.images / f"{rec.key}{rec.suffix}", root=self.base)

    @staticmethod
    def _segment_lines(rec: ImageRecord) -> str:
        """One polygon line per box, its mask's outline normalised to 0..1 (one mask decoded at a time)."""
        return "".join(yolo_segment(c, mask_polygon(decode(rle)), box, rec.width, rec.height)
                       for c, box, rle in zip(rec.class_ids.tolist(), rec.boxes.tolist(), rec.masks or []))

    @staticmethod
    def _box_lines(rec: ImageRecord) -> str:
        # supervision's detections_to_yolo_annotations writes the same lines, one numpy call per box (~25 us);
        # vectorised here because an image can carry hundreds of boxes.
        wh = np.array([rec.width, rec.height, rec.width, rec.height], np.float64)
        x1, y1, x2, y2 = (rec.boxes / wh).T
        rows = zip(rec.class_ids.tolist(), ((x1 + x2) / 2).tolist(), ((y1 + y2) / 2).tolist(),
                   (x2 - x1).tolist(), (y2 - y1).tolist())
        return "".join(f"{c} {xc:.5f} {yc:.5f} {w:.5f} {h:.5f}\n" for c, xc, yc, w, h in rows)
