"""Tile settings and the tile grid: overlapping windows that cover an image, the last ones flush with its border."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovdet.errors import TileError

MERGES = ("nms", "nmm")
METRICS = ("ios", "iou")


@dataclass(frozen=True)
class TileSpec:
    """How to slice: `size`-pixel square tiles overlapping by `overlap` (a fraction of the tile), an optional
    full-image pass, and how boxes found twice are merged: `merge` "nms" keeps the best box, "nmm" (SAHI's greedy
    non-max merging) replaces a group by its union; boxes of one class group when their `match_metric` ("ios":
    intersection over the smaller box, "iou") is over `match_threshold`. `batch` tiles go through one forward."""

    size: int = 640
    overlap: float = 0.2
    full_image: bool = True
    merge: str = "nms"
    match_threshold: float = 0.5
    match_metric: str = "ios"
    batch: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise TileError(f"tile size must be a positive whole number of pixels (e.g. 640), got {self.size!r}")
        if not (0.0 <= float(self.overlap) < 1.0):
            raise TileError(f"tile overlap must be a fraction in [0, 1), e.g. 0.2, got {self.overlap!r}")
        if self.merge not in MERGES:
            raise TileError(f"unknown merge {self.merge!r}: use 'nms' (keep the best box) or 'nmm' (merge into "
                             "their union)")
        if self.match_metric not in METRICS:
            raise TileError(f"unknown match_metric {self.match_metric!r}: use 'ios' or 'iou'")
        if not (0.0 <= float(self.match_threshold) <= 1.0):
            raise TileError(f"match_threshold must be in [0, 1], got {self.match_threshold!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, (int, np.integer)) or self.batch < 1:
            raise TileError(f"tile batch must be at least 1, got {self.batch!r}")

    @property
    def stride(self) -> int:
        """Pixels from one tile to the next: the tile less its overlap (as SAHI counts it)."""
        return max(1, self.size - int(self.overlap * self.size))

    def settings(self) -> dict:
        """A plain dict of the settings (for run manifests)."""
        return {"size": int(self.size), "overlap": float(self.overlap), "full_image": bool(self.full_image),
                "merge": self.merge, "match_threshold": float(self.match_threshold),
                "match_metric": self.match_metric}


def tile_spec(tile: int | TileSpec | None, overlap: float = 0.2, full_image: bool = True,
              merge: str = "nms") -> TileSpec | None:
    """The TileSpec that the detect keywords mean: None (no tiling), a tile size with the other keywords, or a spec."""
    if tile is None or isinstance(tile, TileSpec):
        return tile
    return TileSpec(size=tile, overlap=overlap, full_image=full_image, merge=merge)


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


def tile_grid(width: int, height: int, size: int, overlap: float = 0.2) -> np.ndarray:
    """Tiles covering a width×height image, row by row: [N, 4] int64 (x0, y0, x1, y1).

    Tiles are `size` square and step by size - int(overlap * size); the last tile of a row (column) is moved
    back to end at the image border, so every pixel is covered by equal-sized tiles. A side shorter than a tile
    gets one tile of that side's length. The same grid as SAHI's get_slice_bboxes.
    """
    if width < 1 or height < 1:
        raise TileError(f"cannot tile an empty image ({width}×{height} pixels)")
    stride = TileSpec(size=size, overlap=overlap).stride
    xs, ys = _starts(width, size, stride), _starts(height, size, stride)
    tw, th = min(size, width), min(size, height)
    return np.array([(x, y, x + tw, y + th) for y in ys for x in xs], dtype=np.int64).reshape(-1, 4)
