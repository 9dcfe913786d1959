"""Pascal VOC dataset writer: one XML annotation per image, in the layout supervision's VOC loader reads.

On disk, under OUT/voc/:

    Annotations/KEY.xml   <annotation> with filename, path (shown escaped), size and one <object> per box:
                          name, <score> (5 decimals) and a 1-based integer-pixel <bndbox>
    JPEGImages/KEY.EXT    the original image (a symbolic link, else a hard link, else a copy)
    SegmentationObject/KEY.png  with --masks: VOC's instance PNG, one palette index per object (1, 2, ... in the
                          order of the <object>s, 0 background); where masks overlap, the higher score wins. The
                          XML then says <segmented>1</segmented>

KEY is the image's flat output stem (ovdet.datasets.keys). Every file is replaced whole (ovdet.util.safeio) and no
link below the output folder is followed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from ovdet.masks.rle import decode
from ovdet.runs.journal import ImageRecord
from ovdet.util.display import shown
from ovdet.util.safeio import atomic_link, atomic_write, ensure_dir, remove_stale_temp_files

__all__ = ["VocWriter"]


class VocWriter:
    """Pascal VOC layout: Annotations/ (one XML per image) and JPEGImages/ (links to the originals)."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str]):
        self.root = Path(root)
        self.classes = list(classes)
        self.annotations = self.root / "Annotations"
        self.images = self.root / "JPEGImages"
        self.segmentation = self.root / "SegmentationObject"
        self.base = self.root.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        for folder in (self.annotations, self.images, self.segmentation):
            ensure_dir(folder, self.base)
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
                                     width=rec.width, height=rec.height, objects="".join(objects),
                                     segmented=int(rec.masks is not None))
        if rec.masks is not None:
            atomic_write(self.segmentation / f"{rec.key}.png", _instance_png(rec), root=self.base)
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
  <segmented>{segmented}</segmented>
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


def _voc_palette() -> list[int]:
    """The Pascal VOC colour map (index i -> the bits of i spread over R, G and B), 256 colours."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = _voc_palette()


def _instance_png(rec: ImageRecord) -> bytes:
    """The SegmentationObject PNG: object i (1-based, in record order) painted lowest score first, so the higher
    score wins where masks overlap. Indices stop at 254 (255 is VOC's "void"): objects after the 254th are in the
    XML only."""
    index = np.zeros((rec.height, rec.width), np.uint8)
    masks = rec.masks or []
    for i in np.argsort(rec.scores[:254], kind="stable"):
        index[decode(masks[i])] = i + 1
    image = Image.fromarray(index, mode="P")
    image.putpalette(_PALETTE)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
