"""Sliced detection: cut images into tiles, detect in batches of tiles, map boxes back, merge per image."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np
import supervision as sv

from ovdet.tiling.grid import TileSpec, tile_grid
from ovdet.tiling.merge import merge_detections

# detect(list of BGR arrays) -> one sv.Detections per array, from one forward pass (OVDetector.detect_batch)
Detect = Callable[[list[np.ndarray]], list[sv.Detections]]

FULL_PASS_PIXELS = 16_000_000  # full-image passes wait for a batch while their queued images hold fewer pixels


class TileSource(Protocol):
    """An image that hands out tiles: `width`, `height`, `tiles(grid)` yields the pixels of each grid box in
    order, and `overview()` the whole image (or a downscaled copy) with its (x, y) scale to full-size pixels."""

    width: int
    height: int

    def tiles(self, grid: np.ndarray) -> Iterator[np.ndarray]: ...

    def overview(self) -> tuple[np.ndarray, tuple[float, float]]: ...


class ArrayTiles:
    """A decoded image: tiles are views into it, the overview is the image itself."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.height, self.width = image.shape[:2]

    def tiles(self, grid: np.ndarray) -> Iterator[np.ndarray]:
        for x0, y0, x1, y1 in grid:
            yield self.image[y0:y1, x0:x1]

    def overview(self) -> tuple[np.ndarray, tuple[float, float]]:
        return self.image, (1.0, 1.0)


class _Batcher:
    """Queues (image index, scale, offset, pixels) items; each flush is one detect call; boxes go back to their
    image's pixels."""

    def __init__(self, detect: Detect, parts: dict[int, list[sv.Detections]]):
        self.detect, self.parts = detect, parts
        self.items: list[tuple[int, tuple[float, float], int, int, np.ndarray]] = []

    @property
    def pixels(self) -> int:
        return sum(a.shape[0] * a.shape[1] for *_, a in self.items)

    def add(self, index: int, scale: tuple[float, float], x0: int, y0: int, pixels: np.ndarray) -> None:
        self.items.append((index, scale, int(x0), int(y0), pixels))

    def flush(self) -> None:
        if not self.items:
            return
        results = self.detect([a for *_, a in self.items])
        if len(results) != len(self.items):
            raise RuntimeError(f"detect returned {len(results)} results for {len(self.items)} images")
        for (index, scale, x0, y0, _), dets in zip(self.items, results):
            if len(dets):
                sx, sy = scale
                dets.xyxy = (dets.xyxy.astype(np.float64) * (sx, sy, sx, sy) + (x0, y0, x0, y0)).astype(np.float32)
                self.parts[index].append(dets)
        self.items = []


def detect_tiled(detect: Detect, images: Iterable[np.ndarray | TileSource], spec: TileSpec,
                 max_det: int = 300) -> list[sv.Detections]:
    """Sliced detection of several images: one `sv.Detections` per image, in its pixels, sorted by confidence.

    The tiles of every image stream through `detect` in batches of `spec.batch` (tiles of consecutive images
    share a batch); with `spec.full_image` each image is also detected whole (batched with other images'
    full passes), unless its one tile already is the whole image. Boxes are mapped back, clipped to the image
    and merged per image (spec.merge), keeping at most `max_det`. Only the current image and one batch of tiles
    are held, so a source that reads tiles lazily keeps memory bounded.
    """
    parts: dict[int, list[sv.Detections]] = {}
    shapes: list[tuple[int, int]] = []
    tiles, full = _Batcher(detect, parts), _Batcher(detect, parts)
    for index, image in enumerate(images):
        source = ArrayTiles(image) if isinstance(image, np.ndarray) else image
        parts[index] = []
        shapes.append((source.height, source.width))
        grid = tile_grid(source.width, source.height, spec.size, spec.overlap)
        for box, pixels in zip(grid, source.tiles(grid)):
            tiles.add(index, (1.0, 1.0), box[0], box[1], pixels)
            if len(tiles.items) >= spec.batch:
                tiles.flush()
        whole = len(grid) == 1 and grid[0, 2] == source.width and grid[0, 3] == source.height
        if spec.full_image and not whole:
            pixels, scale = source.overview()
            full.add(index, scale, 0, 0, pixels)
            if len(full.items) >= spec.batch or full.pixels >= FULL_PASS_PIXELS:
                full.flush()
        del source, image
    tiles.flush()
    full.flush()
    return [_finish(parts[i], h, w, spec, max_det) for i, (h, w) in enumerate(shapes)]


def _finish(parts: list[sv.Detections], height: int, width: int, spec: TileSpec, max_det: int) -> sv.Detections:
    if not parts:
        empty = sv.Detections.empty()
        empty.data["class_name"] = np.array([], dtype=str)
        return empty
    dets = sv.Detections.merge(parts) if len(parts) > 1 else parts[0]
    dets.xyxy = np.clip(dets.xyxy, 0, [width, height, width, height]).astype(np.float32)
    return merge_detections(dets, spec.merge, spec.match_threshold, spec.match_metric, max_det=max_det)


