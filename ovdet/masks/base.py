"""The segmenter contract (one BGR image and its xyxy boxes in, one bool mask per box out) and the name table.

Every segmenter returns masks in the image's own pixels, one per box and in the boxes' order. A box with no area
inside the image (zero or negative width or height, outside the image, not finite) gets an empty mask and an
OVDetWarning; the others are clipped to the image first. ovdet.masks.table maps names to segmenters. Internally a mask travels as a `MaskPart`, the crop that
holds it and where that crop sits, so that a run never needs a dense H×W array per box of a large image
(ovdet.masks.rle encodes a part straight to the image's RLE).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovdet.errors import OVDetWarning

__all__ = ["MaskPart", "Segmenter", "paste", "pixel_rects"]


@dataclass(frozen=True)
class MaskPart:
    """One box's mask as a crop: `mask` (bool h×w) has its top-left pixel at column `x`, row `y` of the image."""

    x: int
    y: int
    mask: np.ndarray

    @classmethod
    def empty(cls) -> MaskPart:
        return cls(0, 0, np.zeros((0, 0), bool))

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def pixel_rects(boxes: Any, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The integer pixel rectangles (x0, y0, x1, y1; x1, y1 exclusive) that xyxy `boxes` cover inside a width×height
    image, and which boxes have any (a box is usable when it is finite and overlaps the image with positive area)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    b = np.where(finite[:, None], b, 0.0)
    clipped = np.clip(b, 0, [width, height, width, height])
    usable = finite & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) \
        & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    rects = np.concatenate([np.floor(clipped[:, :2]), np.ceil(clipped[:, 2:])], axis=1).astype(np.int64)
    rects[~usable] = 0
    return rects, usable


def paste(parts: Sequence[MaskPart], height: int, width: int) -> np.ndarray:
    """Dense bool masks [N, height, width] from mask parts."""
    out = np.zeros((len(parts), height, width), bool)
    for i, part in enumerate(parts):
        h, w = part.mask.shape
        if h and w:
            out[i, part.y:part.y + h, part.x:part.x + w] = part.mask
    return out


def _image(image: Any) -> np.ndarray:
    from ovdet.media.sources import load_image

    return load_image(image)


class Segmenter(ABC):
    """Turns boxes into instance masks. `segment(image, boxes)` -> bool [N, H, W]; `segment_parts` -> MaskParts."""

    name: str = ""

    def segment(self, image: Any, boxes: Any) -> np.ndarray:
        """One bool mask per xyxy box (original pixels) of a BGR image (an array, path or PIL image): [N, H, W]."""
        image = _image(image)
        return paste(self.segment_parts(image, boxes), *image.shape[:2])

    def segment_parts(self, image: Any, boxes: Any) -> list[MaskPart]:
        """Like `segment`, each mask as the crop that holds it (empty for a box with no area in the image)."""
        image = _image(image)
        height, width = image.shape[:2]
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        rects, usable = pixel_rects(boxes, width, height)
        for i in np.flatnonzero(~usable):
            warnings.warn(f"box {i} {np.round(boxes[i], 2).tolist()} has no area inside the {width}x{height} "
                          f"image: its mask is empty", OVDetWarning, stacklevel=2)
        parts = [MaskPart.empty() for _ in range(len(boxes))]
        keep = np.flatnonzero(usable)
        if len(keep):
            clipped = np.clip(boxes[keep], 0, [width, height, width, height])
            found = self._segment(image, clipped, rects[keep])
            if len(found) != len(keep):
                raise RuntimeError(f"{self.name} returned {len(found)} masks for {len(keep)} boxes")
            for i, part in zip(keep, found):
                parts[i] = part
        return parts

    @abstractmethod
    def _segment(self, image: np.ndarray, boxes: np.ndarray, rects: np.ndarray) -> list[MaskPart]:
        """Masks for boxes that all lie inside the image: `boxes` float xyxy, `rects` the integer pixels they cover."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
