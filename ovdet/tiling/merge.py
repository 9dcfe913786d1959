"""Merging boxes found by several tiles: class-aware greedy NMS or SAHI's greedy non-max merging (NMM)."""

from __future__ import annotations

import numpy as np
import supervision as sv


def overlap(box: np.ndarray, boxes: np.ndarray, metric: str = "ios") -> np.ndarray:
    """Overlap of one xyxy box with each of `boxes` [N, 4]: intersection over the smaller box ("ios") or over the
    union ("iou"); 0 where the denominator is 0 (empty boxes)."""
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = max(float((box[2] - box[0]) * (box[3] - box[1])), 0.0)
    areas = np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0, None)
    denom = np.minimum(areas, area) if metric == "ios" else area + areas - inter
    return np.divide(inter, denom, out=np.zeros_like(inter, dtype=np.float64), where=denom > 0)


def greedy_groups(xyxy: np.ndarray, scores: np.ndarray, class_id: np.ndarray, threshold: float,
                  metric: str = "ios", merge: bool = False, limit: int | None = None) -> list[np.ndarray]:
    """Greedy grouping in descending score: the best box left leads a group and takes every box of its class
    that overlaps it (NMS: over `threshold`; NMM: at or over it, as SAHI and supervision count). Returns index
    arrays, leader first, the rest by descending score; at most `limit` groups.

    The same groups as supervision's box_non_max_suppression / box_non_max_merge, but without their N×N overlap
    matrix (tens of thousands of tile boxes would need gigabytes) and stopping after `limit` groups: the output
    is sorted by leader score, so the first `limit` groups are exactly the ones a max_det cut would keep.
    """
    n = len(xyxy)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    alive = np.ones(n, dtype=bool)
    by_class = {int(c): np.flatnonzero(class_id == c) for c in np.unique(class_id)}
    xyxy = xyxy.astype(np.float64, copy=False)
    groups: list[np.ndarray] = []
    for i in order:
        if not alive[i]:
            continue
        alive[i] = False
        members = by_class[int(class_id[i])]
        members = members[alive[members]]
        by_class[int(class_id[i])] = members  # drop the dead from the class list as we go
        ov = overlap(xyxy[i], xyxy[members], metric)
        taken = members[ov >= threshold] if merge else members[ov > threshold]
        alive[taken] = False
        groups.append(np.concatenate([[i], taken[np.argsort(rank[taken])]]).astype(np.int64))
        if limit is not None and len(groups) >= limit:
            break
    return groups


def merge_detections(dets: sv.Detections, method: str = "nms", threshold: float = 0.5, metric: str = "ios",
                     max_det: int | None = None) -> sv.Detections:
    """Class-aware NMS or greedy NMM over boxes in one image's pixels; the result sorted by confidence.

    NMM (SAHI's GREEDYNMM): each leader absorbs its group's boxes one by one, best first, while the grown box
    still overlaps the next one at the threshold; the merged box is their union, with the leader's class and
    data and the highest confidence.
    """
    if len(dets) == 0:
        return dets
    conf = dets.confidence.astype(np.float64)
    groups = greedy_groups(dets.xyxy, conf, dets.class_id, threshold, metric, merge=method == "nmm", limit=max_det)
    leaders = np.array([g[0] for g in groups], dtype=np.int64)
    out = dets[leaders]
    if method == "nmm":
        xyxy = out.xyxy.astype(np.float64).copy()
        for k, group in enumerate(groups):
            for j in group[1:]:
                if overlap(xyxy[k], dets.xyxy[j:j + 1].astype(np.float64), metric)[0] >= threshold:
                    xyxy[k, :2] = np.minimum(xyxy[k, :2], dets.xyxy[j, :2])
                    xyxy[k, 2:] = np.maximum(xyxy[k, 2:], dets.xyxy[j, 2:])
        out.xyxy = xyxy.astype(dets.xyxy.dtype)
    return out
