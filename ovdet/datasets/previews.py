"""Annotated previews: a JPEG copy of each image with its boxes and labels drawn (supervision), for a human to look at.

On disk: PREVIEWS/KEY.jpg, one per image (`ovdet annotate --save-annotated` puts them in OUT/annotated/), JPEG
quality 90 by default. KEY is the image's flat output stem (ovdet.datasets.keys). Every file is replaced whole
(ovdet.util.safeio) and no link below the output folder is followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ovdet.media.draw import draw
from ovdet.runs.journal import ImageRecord
from ovdet.util.safeio import atomic_write, ensure_dir, remove_stale_temp_files

__all__ = ["PreviewWriter"]


class PreviewWriter:
    """Annotated JPEG copies (boxes and labels drawn with supervision) under one folder."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str], quality: int = 90):
        self.root = Path(root)
        self.classes = list(classes)
        self.quality = quality
        self.base = self.root.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        ensure_dir(self.root, self.base)
        remove_stale_temp_files(self.root, self.base)

    def write(self, rec: ImageRecord, image: np.ndarray) -> None:
        ok, buf = cv2.imencode(".jpg", draw(image, rec.detections(self.classes)),
                               [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError(f"could not encode the annotated preview of {rec.path}")
        atomic_write(self.root / f"{rec.key}.jpg", buf.tobytes(), root=self.base)
