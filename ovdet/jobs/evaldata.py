"""Labelled datasets for `ovdet eval` and `ovdet train`: a YOLO data.yaml or a COCO json, with boxes and masks.

Boxes are YOLO normalized xywh or COCO pixel xyxy; masks (segments) are YOLO segment polygons or COCO segmentations,
drawn as RLEs per image when it is scored (ovdet.jobs.evalmasks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervision as sv
import yaml

from ovdet.errors import DatasetError
from ovdet.jobs.evalmasks import check_coco_segmentation, gt_rles
from ovdet.media.sources import IMAGE_EXTENSIONS, list_image_files

__all__ = ["LabelledDataset", "LabelledImage", "load_dataset"]


@dataclass
class LabelledImage:
    """One image and its ground truth: boxes (N×4) as YOLO normalized xywh or COCO pixel xyxy, class ids, and
    `segments` (each object's YOLO polygon or COCO segmentation; None: no masks)."""

    path: Path
    boxes: np.ndarray
    class_ids: np.ndarray
    normalized: bool
    iscrowd: np.ndarray | None = None
    segments: list | None = None

    def masks(self, shape: tuple[int, ...]) -> list[dict] | None:
        """Each object's mask as an RLE for an image of this (H, W, ...) shape (None: no masks)."""
        return gt_rles(self.segments, self.normalized, shape[0], shape[1], str(self.path))

    def targets(self, shape: tuple[int, ...]) -> sv.Detections:
        """Ground truth in pixel xyxy for an image of this (H, W, ...) shape."""
        boxes = self.boxes.astype(np.float64)
        if self.normalized and len(boxes):
            h, w = shape[:2]
            cx, cy, bw, bh = boxes.T
            boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], axis=1)
        data = {} if self.iscrowd is None else {"iscrowd": self.iscrowd}
        return sv.Detections(xyxy=boxes.reshape(-1, 4).astype(np.float32), class_id=self.class_ids.astype(int),
                             data=data)


@dataclass
class LabelledDataset:
    """A labelled split: class names (index = class id) and its images."""

    names: list[str]
    images: list[LabelledImage]
    source: str

    @property
    def has_masks(self) -> bool:
        """Every object has a mask (and there is one)."""
        return all(im.segments is not None for im in self.images) and any(im.segments for im in self.images)


# ---------------------------------------------------------------- datasets


def load_dataset(source: str | Path, split: str = "val") -> LabelledDataset:
    """A YOLO dataset (data.yaml, or a folder holding one) or a COCO dataset (.json, or a folder holding one)."""
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"{path} does not exist: give a YOLO data.yaml, a COCO annotations .json, or their folder.")
    if path.is_dir():
        yamls = sorted(p for p in path.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
        jsons = sorted(path.glob("*.json"))
        if len(yamls) == 1:
            path = yamls[0]
        elif len(jsons) == 1 and not yamls:
            path = jsons[0]
        else:
            raise DatasetError(f"{path} holds {len(yamls)} yaml and {len(jsons)} json files: point to the one "
                               "data.yaml (YOLO) or annotations .json (COCO) to use.")
    if path.suffix in (".yaml", ".yml"):
        return _load_yolo(path, split)
    if path.suffix == ".json":
        return _load_coco(path)
    raise DatasetError(f"{path} is neither a YOLO data.yaml nor a COCO .json file.")


def _yolo_names(raw: object, path: Path) -> list[str]:
    if isinstance(raw, Mapping):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: 'names' keys must be class ids 0..N-1.") from exc
        if ids != list(range(len(ids))):
            raise DatasetError(f"{path}: 'names' keys must be the class ids 0..N-1 without gaps.")
        return [str(raw[k] if k in raw else raw[str(k)]) for k in ids]
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    raise DatasetError(f"{path} has no 'names': list the class names, e.g. names: {{0: person, 1: bus}}.")


def _yolo_image_files(entry: str, root: Path, path: Path) -> list[Path]:
    target = Path(entry) if Path(entry).is_absolute() else root / entry
    if target.is_dir():
        return list_image_files(target)
    if target.suffix == ".txt" and target.is_file():  # a list of image paths, relative to the dataset root
        lines = [ln.strip() for ln in target.read_text().splitlines() if ln.strip()]
        return [Path(ln) if Path(ln).is_absolute() else (root / ln) for ln in lines]
    if target.suffix.lower() in IMAGE_EXTENSIONS and target.is_file():
        return [target]
    raise DatasetError(f"{path}: split entry {entry!r} -> {target} is not an image folder or list file.")


def _load_yolo(path: Path, split: str) -> LabelledDataset:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path} could not be read as YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path} is not a YOLO data.yaml (expected keys train, val, names).")
    names = _yolo_names(data.get("names"), path)
    entries = data.get(split)
    if not entries:
        raise DatasetError(f"{path} has no '{split}' split: choose one of "
                           f"{[k for k in ('train', 'val', 'test') if data.get(k)]} with --split.")
    root = Path(data["path"]) if data.get("path") else path.parent
    root = root if root.is_absolute() or not data.get("path") else path.parent / root
    files = [f for e in (entries if isinstance(entries, list) else [entries])
             for f in _yolo_image_files(str(e), root, path)]
    images = []
    for f in files:
        boxes, cls, polygons = _read_yolo_labels(_label_path(f), len(names))
        images.append(LabelledImage(f, boxes, cls, normalized=True, segments=polygons))
    return LabelledDataset(names, images, str(path))


def _read_yolo_labels(label: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, list | None]:
    """Normalized xywh boxes, class ids and polygons (None unless every row is one) of one YOLO label file (missing
    file = no objects). Rows are 'class cx cy w h', or 'class x1 y1 x2 y2 ...' polygons (segment labels).
    """
    boxes, cls, polygons = [], [], []
    lines = label.read_text().splitlines() if label.is_file() else []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError as exc:
            raise DatasetError(f"{label}:{n}: not a YOLO label row ('class cx cy w h'): {line!r}.") from exc
        if len(values) == 5:
            boxes.append(values[1:])
            polygons.append(None)
        elif len(values) >= 7 and len(values) % 2 == 1:
            xy = np.array(values[1:]).reshape(-1, 2)
            polygons.append(xy)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            boxes.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        else:
            raise DatasetError(f"{label}:{n}: a row needs 'class cx cy w h' or a polygon, got {len(values)} numbers.")
        c = values[0]
        if c != int(c) or not 0 <= c < num_classes:
            raise DatasetError(f"{label}:{n}: class id {values[0]:g} is not one of the names 0..{num_classes - 1}.")
        cls.append(int(c))
    return (np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(cls, dtype=int),
            None if any(p is None for p in polygons) else polygons)


def _label_path(image: Path) -> Path:
    """YOLO convention: .../images/x.png -> .../labels/x.txt (last 'images' folder in the path)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _load_coco(path: Path) -> LabelledDataset:
    try:
        coco = json.loads(path.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        images_meta = coco["images"]
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a COCO annotations file (needs images, annotations, categories).") from exc
    names = [str(c["name"]) for c in cats]
    index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[int, list[dict]] = {im["id"]: [] for im in images_meta}
    for ann in annotations:
        if ann.get("image_id") not in per_image or ann.get("category_id") not in index:
            raise DatasetError(f"{path}: annotation {ann.get('id')} refers to an unknown image or category.")
        per_image[ann["image_id"]].append(ann)
    images = []
    for meta in images_meta:
        anns = per_image[meta["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        candidates = [path.parent / meta["file_name"], path.parent / "images" / meta["file_name"]]
        file = next((c for c in candidates if c.exists()), candidates[0])
        segments = [check_coco_segmentation(a["segmentation"], f"{path}: annotation {a.get('id')}") for a in anns] \
            if all(a.get("segmentation") for a in anns) else None
        images.append(LabelledImage(file, xyxy, np.array([index[a["category_id"]] for a in anns], dtype=int),
                                    normalized=False, iscrowd=np.array([int(a.get("iscrowd", 0)) for a in anns]),
                                    segments=segments))
    return LabelledDataset(names, images, str(path))
