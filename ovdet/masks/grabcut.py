"""`grabcut`: OpenCV's GrabCut initialised from each box, on a crop around it; no weights, works offline.

The box's pixels start as probable foreground and everything else in the crop (the box grown by a margin on every
side) as background, which also gives the background colour model local samples. The mask therefore never leaves
its box. A box under 4 pixels on a side is too small for GrabCut's colour models and is filled whole. OpenCV's
random generator is seeded before every box, so the same image and box give the same mask on every call.
"""

from __future__ import annotations

import cv2
import numpy as np

from ovdet.masks.base import MaskPart, Segmenter

__all__ = ["GrabCutSegmenter"]

MIN_SIDE = 4  # px: a smaller box is filled whole


class GrabCutSegmenter(Segmenter):
    """GrabCut per box: `iterations` rounds on a crop of the box grown by `margin` of its longer side (at least
    `min_margin` px) on each side."""

    name = "grabcut"

    def __init__(self, iterations: int = 5, margin: float = 0.25, min_margin: int = 8):
        self.iterations, self.margin, self.min_margin = int(iterations), float(margin), int(min_margin)

    def _segment(self, image: np.ndarray, boxes: np.ndarray, rects: np.ndarray) -> list[MaskPart]:
        height, width = image.shape[:2]
        parts = []
        for x0, y0, x1, y1 in rects.tolist():
            w, h = x1 - x0, y1 - y0
            if min(w, h) < MIN_SIDE:
                parts.append(MaskPart(x0, y0, np.ones((h, w), bool)))
                continue
            m = max(self.min_margin, int(round(self.margin * max(w, h))))
            cx0, cy0, cx1, cy1 = max(0, x0 - m), max(0, y0 - m), min(width, x1 + m), min(height, y1 + m)
            crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
            state = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
            state[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] = cv2.GC_PR_FGD
            if not (state != cv2.GC_PR_FGD).any():  # the box is the whole image: its rim is the background sample
                state[[0, -1], :] = cv2.GC_PR_BGD
                state[:, [0, -1]] = cv2.GC_PR_BGD
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.setRNGSeed(0)
            cv2.grabCut(crop, state, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
            inside = state[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
            parts.append(MaskPart(x0, y0, (inside == cv2.GC_FGD) | (inside == cv2.GC_PR_FGD)))
        return parts
