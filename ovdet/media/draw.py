"""Drawing detections on images with supervision's annotators (masks, when the detections have them, under the boxes)."""

from __future__ import annotations

import numpy as np
import supervision as sv

_BOXES = sv.BoxAnnotator(thickness=2)
_MASKS = sv.MaskAnnotator(opacity=0.45)
# smart_position keeps every label inside the image (a box at the top edge would push its label above it) and
# spreads out labels that would overlap, so each stays readable.
_LABELS = sv.LabelAnnotator(text_scale=0.5, text_padding=3, smart_position=True)


def labels(detections: sv.Detections) -> list[str]:
    """"class #id score" per detection (the "#id" part only when the detections are tracked)."""
    names = detections.data.get("class_name", [str(c) for c in detections.class_id])
    ids = detections.tracker_id if detections.tracker_id is not None else [None] * len(detections)
    return [f"{name}{'' if tid is None else f' #{int(tid)}'} {score:.2f}"
            for name, tid, score in zip(names, ids, detections.confidence)]


def draw(image: np.ndarray, detections: sv.Detections) -> np.ndarray:
    """A copy of a BGR image with boxes, "class #id score" labels and (when present) instance masks drawn on it."""
    canvas = image.copy()
    if detections.mask is not None:
        canvas = _MASKS.annotate(canvas, detections)
    canvas = _BOXES.annotate(canvas, detections)
    return _LABELS.annotate(canvas, detections, labels=labels(detections))
