"""Masks in a large image, window by window: boxes are grouped into windows about a tile wide, each window segmented
once (one SAM encoder pass for all its boxes) and its masks placed back in the image's pixels.

Used with tiled detection (ovdet.tiling): SAM letterboxes whatever it is given to 1024 px, so a whole 8000 px image
would shrink every small object out of sight, and GrabCut's cost grows with the pixels it sees. A window is the
box grown to `window` px (or 1.25× the box when that is larger), moved inside the image; windows are read in
top-to-bottom order, so a source that streams rows (ovdet.tiling.reader's libvips reader) can serve them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ovdet.errors import OVDetWarning
from ovdet.masks.base import MaskPart, Segmenter, pixel_rects

__all__ = ["segment_windows"]


def _windows(rects: np.ndarray, usable: np.ndarray, width: int, height: int,
             window: int) -> list[tuple[np.ndarray, list[int]]]:
    """Greedy: each window centred on the first unplaced box (top to bottom) takes every unplaced box inside it."""
    left = [int(i) for i in np.flatnonzero(usable)[np.argsort(rects[usable][:, 1], kind="stable")]]
    out = []
    while left:
        x0, y0, x1, y1 = rects[left[0]]
        w = min(width, max(window, math.ceil(1.25 * (x1 - x0))))
        h = min(height, max(window, math.ceil(1.25 * (y1 - y0))))
        wx = int(np.clip((x0 + x1 - w) // 2, 0, width - w))
        wy = int(np.clip((y0 + y1 - h) // 2, 0, height - h))
        box = np.array([wx, wy, wx + w, wy + h])
        inside = [i for i in left if rects[i, 0] >= wx and rects[i, 1] >= wy and rects[i, 2] <= wx + w
                  and rects[i, 3] <= wy + h]
        out.append((box, inside))
        left = [i for i in left if i not in set(inside)]
    out.sort(key=lambda item: int(item[0][1]))
    return out


def segment_windows(segmenter: Segmenter, source: Any, boxes: Any, window: int) -> list[MaskPart]:
    """One MaskPart per xyxy box of `source` (a TileSource: `width`, `height`, `tiles(grid)`), in its pixels."""
    width, height = int(source.width), int(source.height)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rects, usable = pixel_rects(boxes, width, height)
    for i in np.flatnonzero(~usable):
        warnings.warn(f"box {i} {np.round(boxes[i], 2).tolist()} has no area inside the {width}x{height} image: "
                      "its mask is empty", OVDetWarning, stacklevel=2)
    parts = [MaskPart.empty() for _ in range(len(boxes))]
    plan = _windows(rects, usable, width, height, int(window))
    if not plan:
        return parts
    grid = np.array([box for box, _ in plan], np.int64)
    for (box, members), pixels in zip(plan, source.tiles(grid)):
        wx, wy = int(box[0]), int(box[1])
        local = boxes[members] - [wx, wy, wx, wy]
        for i, part in zip(members, segmenter.segment_parts(np.ascontiguousarray(pixels), local)):
            parts[i] = MaskPart(part.x + wx, part.y + wy, part.mask) if part.mask.size else part
    return parts
