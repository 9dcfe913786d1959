"""The dataset formats of a run: parse a `--format` list, open its writers, rebuild whole-run files from the journal.

Layout of an output folder OUT, by format (each format's module documents its own files):

    OUT/predictions.jsonl   jsonl: one line per image, written by every run (it is the journal that a resume reads,
                            ovdet.runs.journal)
    OUT/coco/               coco: annotations.json, + train.json and val.json with a split (ovdet.datasets.coco)
    OUT/yolo/               yolo: data.yaml, images/, labels/, + train.txt, val.txt with a split (ovdet.datasets.yolo)
    OUT/voc/                voc: Annotations/, JPEGImages/ (ovdet.datasets.voc)

The formats follow supervision's dataset conventions (1-based COCO categories, 1-based VOC pixel boxes, 5-decimal
YOLO lines) and load with its loaders; the writers add streaming and crash safety: every file is written whole or
not at all and never through a link (ovdet.util.safeio), and none holds more than one image's detections in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ovdet.datasets.coco import CocoWriter
from ovdet.datasets.splits import ValSplit
from ovdet.datasets.voc import VocWriter
from ovdet.datasets.yolo import YoloWriter
from ovdet.errors import DatasetError
# the dataset formats annotate can write (defined in ovdet.options, so that the CLI parser needs no OpenCV)
from ovdet.options import DATASET_FORMATS as FORMATS

__all__ = ["FORMATS", "ImageWriter", "open_dataset_writers", "parse_formats", "rebuild_from_journal"]

ImageWriter = YoloWriter | VocWriter  # the formats written image by image (COCO is rebuilt from the journal)


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


def open_dataset_writers(root: str | os.PathLike, classes: Sequence[str], formats: Sequence[str],
                         info: dict[str, Any] | None = None, split: ValSplit | None = None,
                         ) -> tuple[list[ImageWriter], CocoWriter | None]:
    """The started per-image writers (YOLO, VOC) and the COCO writer that `formats` ask for, under `root`.

    `split` (a train/val split) applies to the YOLO and COCO outputs.
    """
    root = Path(root)
    writers: list[ImageWriter] = []
    if "yolo" in formats:
        writers.append(YoloWriter(root / "yolo", classes, split))
    if "voc" in formats:
        writers.append(VocWriter(root / "voc", classes))
    coco = CocoWriter(root / "coco" / "annotations.json", classes, info, split) if "coco" in formats else None
    for writer in [*writers, coco]:
        if writer is not None:
            writer.start()
    return writers, coco


def rebuild_from_journal(writers: Sequence[ImageWriter], coco: CocoWriter | None,
                         journal: str | os.PathLike, end: int | None = None) -> None:
    """Rewrite the files that cover the whole dataset (COCO files, YOLO split lists) from the journal."""
    for writer in writers:
        if isinstance(writer, YoloWriter):
            writer.rebuild(journal, end)
    if coco is not None:
        coco.rebuild(journal, end)
