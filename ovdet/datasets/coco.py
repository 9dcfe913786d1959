"""COCO dataset writer: one detection JSON for the whole run, rebuilt from the journal (never held in memory).

On disk, under OUT/coco/:

    annotations.json      every image: info, licenses [], categories (ids 1-based: class_id + 1), images (file_name
                          is the path relative to the input folder), annotations (xywh bbox, area, score; with
                          --masks a compressed RLE `segmentation`, as pycocotools writes it, and the mask's area)
    train.json, val.json  with a val split only: the same document for each split's images

Each file is streamed from predictions.jsonl to a temporary file and swapped in (ovdet.util.safeio), at every
checkpoint and at the end of a run; no link below the output folder is followed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from supervision.dataset.formats.coco import classes_to_coco_categories

from ovdet.datasets.splits import ValSplit
from ovdet.masks.rle import area as mask_area
from ovdet.runs.journal import checked_image_record, checked_record, read_journal
from ovdet.util.safeio import atomic_open, ensure_dir, remove_stale_temp_files

__all__ = ["CocoWriter"]


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
        ensure_dir(self.path.parent, self.base)
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
                    seg = d.get("segmentation")  # an RLE the first pass vetted (ovdet.runs.journal)
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": d["class_id"] + 1,
                                 "bbox": [x1, y1, w, h], "area": round(w * h, 2) if seg is None else mask_area(seg),
                                 "segmentation": [] if seg is None else seg, "iscrowd": 0, "score": d["score"]})
                if anns:
                    fh.write(("\n" if anns[0]["id"] == 1 else ",\n") + dump(anns)[1:-1].replace("},{", "},\n{"))
            fh.write("]}\n")
