"""Eval-run statistics for the report: predictions matched to ground truth, PR curves, a confusion matrix.

Matching is COCO's at IoU 0.5: per image and class, predictions in descending score order each take the unmatched
ground-truth box they overlap most. It does not depend on the threshold (a higher threshold only removes the
lowest-scoring predictions, which come last), so the browser can count true/false positives and misses at any
slider position from two numbers per box: each prediction's "matched" flag and each ground-truth box's matching
score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import supervision as sv

__all__ = ["confusion", "match_image", "pr_curves"]

IOU = 0.5


def match_image(pred_boxes: np.ndarray, pred_classes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray,
                gt_classes: np.ndarray, iou: float = IOU) -> tuple[np.ndarray, np.ndarray]:
    """(matched flag per prediction, score of the prediction matching each ground-truth box or -1)."""
    matched = np.zeros(len(pred_scores), bool)
    gt_score = np.full(len(gt_classes), -1.0)
    if not len(pred_scores) or not len(gt_classes):
        return matched, gt_score
    ious = sv.box_iou_batch(pred_boxes.astype(np.float64), gt_boxes.astype(np.float64))
    for i in np.argsort(-pred_scores, kind="stable"):
        candidates = (gt_classes == pred_classes[i]) & (gt_score < 0) & (ious[i] >= iou)
        if candidates.any():
            j = int(np.argmax(np.where(candidates, ious[i], -1.0)))
            matched[i] = True
            gt_score[j] = pred_scores[i]
    return matched, gt_score


def pr_curves(scores: Sequence[np.ndarray], matched: Sequence[np.ndarray], gt_counts: Sequence[int],
              points: int = 200) -> list[list[list[float]]]:
    """Per class, up to `points` [recall, precision, score] triples in descending score order."""
    curves = []
    for s, m, n_gt in zip(scores, matched, gt_counts):
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(m[order])
        fp = np.cumsum(~m[order])
        recall = tp / max(n_gt, 1)
        precision = tp / np.maximum(tp + fp, 1)
        keep = np.unique(np.linspace(0, len(order) - 1, min(points, len(order))).round().astype(int)) \
            if len(order) else np.zeros(0, int)
        curves.append([[round(float(recall[k]), 4), round(float(precision[k]), 4), round(float(s[order][k]), 4)]
                       for k in keep])
    return curves


def confusion(predictions: list[sv.Detections], targets: list[sv.Detections], names: Sequence[str],
              thresholds: Sequence[float]) -> list[list[int]]:
    """supervision's confusion matrix (rows: ground truth, columns: predictions, last: background), each
    prediction kept when its score is above its class's threshold."""
    limits = np.asarray(thresholds, np.float64)
    kept = [p[p.confidence > limits[p.class_id]] if len(p) else p for p in predictions]
    matrix = sv.ConfusionMatrix.from_detections(kept, targets, list(names), conf_threshold=0.0, iou_threshold=IOU)
    return matrix.matrix.astype(int).tolist()
