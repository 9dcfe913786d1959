"""Pascal VOC dataset writer: one XML annotation per image, in the layout supervision's VOC loader reads.

On disk, under OUT/voc/:

    Annotations/KEY.xml   <annotation> with filename, path (shown escaped), size and one <object> per box:
                          name, <score> (5 decimals) and a 1-based integer-pixel <bndbox>
    JPEGImages/KEY.EXT    the original image (a symbolic link, else a hard link, else a copy)

KEY is the image's flat output stem (ovdet.datasets.keys). Every file is replaced whole (ovdet.util.safeio) and no
link below the output folder is followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

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
        self.base = self.root.parent  # the output folder: no link is followed below it

    def start(self) -> None:
        for folder in (self.annotations, self.images):
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
