"""Mask mAP for `ovdet eval`: ground-truth masks of COCO and YOLO-segment datasets, scored by pycocotools' COCOeval.

Ground truth: a COCO `segmentation` (polygons, an uncompressed or a compressed RLE) or a YOLO segment label row
(a polygon in pixel-edge coordinates, drawn by the pixel-centre rule, ovdet.masks.rle.polygon_mask, which gives
back exactly the masks `ovdet synth --masks` and `annotate --masks` outlined). A dataset has masks when
every object has one. Predictions are the detector's masks as RLEs (OVDetector.detect_batch(mask_rle=True)), so a
folder costs RLEs, never dense masks. The score is COCOeval with iouType="segm" (area "all", 100 detections per
image and class), next to the box mAP ovdet.jobs.evaluate computes.

Dataset files are hostile: segmentations are checked before pycocotools sees them (an RLE's size and counts, a
polygon's vertex count and length, which sets what pycocotools allocates).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import supervision as sv
from pycocotools import mask as coco_mask

from ovdet.errors import DatasetError
from ovdet.masks.rle import DATA_KEY, area, encode, polygon_mask, rle_problem

__all__ = ["MaskScores", "MaskTally", "check_coco_segmentation", "detector_masks", "gt_rles", "mask_map",
           "prediction_rles"]

MAX_DETS = 100  # COCOeval's detections per image and class
POLYGON_LENGTH = 2_000_000  # px of outline per object (pycocotools allocates ~5 ints per pixel of it)


def check_coco_segmentation(seg: Any, where: str) -> Any:
    """`seg` (an annotation's "segmentation") when it is polygons or an RLE pycocotools can read; DatasetError if not.

    Sizes are checked against the image when it is read (gt_rles)."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and
                              all(isinstance(v, (int, float)) and np.isfinite(v) for v in p) for p in seg):
            raise DatasetError(f"{where}: segmentation polygons need 3 or more x, y pairs of finite numbers each")
        return seg
    if isinstance(seg, dict) and set(seg) == {"size", "counts"}:
        if isinstance(seg["counts"], list):
            size, counts = seg["size"], seg["counts"]
            if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)
                    and all(type(c) is int and c >= 0 for c in counts) and sum(counts) == size[0] * size[1]):
                raise DatasetError(f"{where}: an uncompressed segmentation RLE needs counts that add up to "
                                   "size[0] × size[1]")
            return seg
        problem = rle_problem(seg)
        if problem:
            raise DatasetError(f"{where}: its segmentation {problem}")
        return seg
    raise DatasetError(f"{where}: segmentation is neither polygons nor an RLE ({{'size': [h, w], 'counts': ...}})")


def _coco_rle(seg: Any, height: int, width: int, where: str) -> dict[str, Any]:
    if isinstance(seg, list):
        polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in seg]
        if any(((p < (-width, -height)) | (p > (2 * width, 2 * height))).any() for p in polys):
            raise DatasetError(f"{where}: a segmentation polygon reaches far outside its {width}×{height} image")
        length = sum(float(np.abs(np.diff(np.vstack([p, p[:1]]), axis=0)).max(axis=1).sum()) for p in polys)
        if length > POLYGON_LENGTH:
            raise DatasetError(f"{where}: its segmentation polygons are {length:.0f} px long, more than "
                               f"{POLYGON_LENGTH} px: not an outline of an object in a {width}×{height} image")
        rle = coco_mask.merge(coco_mask.frPyObjects(seg, height, width))
    else:
        if seg["size"] != [height, width]:
            raise DatasetError(f"{where}: its segmentation has size {seg['size']}, not the image's "
                               f"[{height}, {width}]")
        rle = coco_mask.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else dict(seg)
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def gt_rles(segments: Sequence[Any] | None, normalized: bool, height: int, width: int,
            where: str) -> list[dict[str, Any]] | None:
    """One RLE per ground-truth object of an image (None: it has no masks). `segments` are YOLO polygons
    (normalized K×2 arrays) when `normalized`, else COCO segmentations (check_coco_segmentation)."""
    if segments is None:
        return None
    if normalized:  # the pixels whose centres lie inside (coordinates clipped to the image's reach: no overflow)
        return [encode(polygon_mask(np.clip(p, -1.0, 2.0) * (width, height), height, width)) for p in segments]
    return [_coco_rle(s, height, width, where) for s in segments]


def detector_masks(detector: Any) -> bool:
    """Whether `detector` makes masks (its config names a segmenter)."""
    masks = getattr(getattr(detector, "config", None), "masks", None)
    return masks is not None and masks is not False


def prediction_rles(dets: sv.Detections) -> list[dict[str, Any]] | None:
    """The detections' masks as RLEs (from data["mask_rle"] or dense .mask), None when they have none."""
    if DATA_KEY in dets.data:
        return [dict(r) for r in dets.data[DATA_KEY]]
    if dets.mask is not None:
        return [encode(m) for m in dets.mask]
    return None


@dataclass
class MaskScores:
    """Mask mAP over the dataset and AP per evaluation class (only classes with objects)."""

    map50: float
    map50_95: float
    per_class: dict[int, tuple[float, float]] = field(default_factory=dict)  # class -> (AP50, AP50-95)


class MaskTally:
    """Each image's ground-truth and predicted masks (RLEs), collected while an eval runs."""

    def __init__(self) -> None:
        self.images: list[tuple[int, int]] = []
        self.gt: list[tuple[list[dict], np.ndarray, np.ndarray]] = []
        self.pred: list[tuple[list[dict], np.ndarray, np.ndarray]] = []

    def add(self, height: int, width: int, gt_masks: list[dict], gt_classes: np.ndarray, iscrowd: np.ndarray | None,
            pred_masks: list[dict], pred_classes: np.ndarray, pred_scores: np.ndarray) -> None:
        keep = _top(pred_classes, pred_scores)
        self.images.append((height, width))
        self.gt.append((gt_masks, np.asarray(gt_classes, int),
                        np.zeros(len(gt_classes), int) if iscrowd is None else np.asarray(iscrowd, int)))
        self.pred.append(([pred_masks[i] for i in keep], np.asarray(pred_classes, int)[keep],
                          np.asarray(pred_scores, np.float64)[keep]))

    def scores(self, num_classes: int) -> MaskScores:
        return mask_map(self.images, self.gt, self.pred, num_classes)


def _top(classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the MAX_DETS highest scores per class (all COCOeval looks at)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    seen: dict[int, int] = {}
    keep = []
    for i in order.tolist():
        c = int(classes[i])
        seen[c] = seen.get(c, 0) + 1
        if seen[c] <= MAX_DETS:
            keep.append(i)
    return np.array(sorted(keep), int)


def mask_map(images: Sequence[tuple[int, int]], gt: Sequence[tuple[list, np.ndarray, np.ndarray]],
             pred: Sequence[tuple[list, np.ndarray, np.ndarray]], num_classes: int) -> MaskScores:
    """COCOeval "segm" of per-image (RLEs, classes, iscrowd) ground truth and (RLEs, classes, scores) predictions."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, dets = [], []
    for i, ((height, width), (g_rles, g_cls, crowd), (p_rles, p_cls, p_scores)) in enumerate(zip(images, gt, pred), 1):
        for rle, c, k in zip(g_rles, g_cls.tolist(), crowd.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "segmentation": rle,
                         "area": area(rle), "iscrowd": int(k), "bbox": list(coco_mask.toBbox(_bytes(rle)))})
        for rle, c, s in zip(p_rles, p_cls.tolist(), p_scores.tolist()):
            dets.append({"image_id": i, "category_id": c + 1, "segmentation": rle, "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        truth = COCO()
        truth.dataset = {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(images, 1)],
                         "annotations": anns, "categories": [{"id": c + 1} for c in range(num_classes)]}
        truth.createIndex()
        if not dets:  # nothing predicted: AP 0 for every class with objects
            counts = np.bincount([a["category_id"] - 1 for a in anns if not a["iscrowd"]], minlength=num_classes)
            return MaskScores(0.0, 0.0, {c: (0.0, 0.0) for c in range(num_classes) if counts[c]})
        ev = COCOeval(truth, truth.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU, recall, class] at area "all", 100 detections
    per_class = {}
    for c in range(num_classes):
        p = precision[:, :, c]
        if (p > -1).any():
            per_class[c] = (float(p[0][p[0] > -1].mean()), float(p[p > -1].mean()))
    return MaskScores(float(max(ev.stats[1], 0.0)), float(max(ev.stats[0], 0.0)), per_class)


def _bytes(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
