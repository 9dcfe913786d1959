"""Opening an image for tiling: decoded arrays, or (for huge files) a reader that hands out tiles strip by strip."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ovdet.errors import ImageReadError
from ovdet.media.sources import load_image
from ovdet.tiling.run import ArrayTiles, TileSource

# Files with more pixels than this are read in strips of rows (with pyvips), never decoded whole: ~120 MB as BGR.
STREAM_PIXELS = 40_000_000
_STREAM_LOADERS = ("pngload", "tiffload", "jpegload", "webpload")
_PIECE_ROWS = 64


def tile_source(image: Any, overview_size: int = 640, stream_pixels: int | None = None) -> TileSource:
    """A TileSource for a path, BGR array or PIL image; a TileSource is kept as it is.

    Arrays, PIL images and files up to `stream_pixels` (default STREAM_PIXELS) are decoded by load_image's rules. Larger PNG, TIFF, JPEG
    and WebP files are read strip by strip with libvips (`pip install "ovdet[large]"`) when it is installed, so
    only the rows of one row of tiles are in memory; its overview for the full-image pass (`overview_size` on the
    long side) is shrunk from the strips as they pass. Without libvips, a file too large for PIL's safety limit
    is decoded whole with OpenCV (memory: the image plus one batch of tiles).
    """
    if hasattr(image, "tiles") and hasattr(image, "overview"):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        streamed = _vips_tiles(path, overview_size, STREAM_PIXELS if stream_pixels is None else stream_pixels)
        if streamed is not None:
            return streamed
        if _too_large_for_pil(path):
            decoded = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if decoded is None:
                raise ImageReadError(f"{path}: too large for PIL and OpenCV could not decode it; install libvips "
                                     "support (pip install \"ovdet[large]\") to read it in strips")
            return ArrayTiles(decoded)
    return ArrayTiles(load_image(image))


def _too_large_for_pil(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return False
    except Image.DecompressionBombError:
        return True
    except Exception:  # not an image PIL knows, missing, ...: load_image says what is wrong
        return False


def _vips_tiles(path: Path, overview_size: int, stream_pixels: int) -> VipsTiles | None:
    """A strip reader for a large file libvips can stream, else None (the file is decoded whole)."""
    try:
        import pyvips
    except (ImportError, OSError):  # not installed, or its libvips is missing
        return None
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential")
    except pyvips.Error:
        return None  # unreadable or unknown: load_image gives the ovdet error
    if image.width * image.height <= stream_pixels:
        return None
    fields = image.get_fields()
    orientation = image.get("orientation") if "orientation" in fields else 1
    loader = image.get("vips-loader") if "vips-loader" in fields else ""
    if (loader not in _STREAM_LOADERS or orientation != 1 or image.format not in ("uchar", "ushort")
            or image.bands not in (1, 2, 3, 4) or image.interpretation not in ("b-w", "srgb", "grey16", "rgb16")):
        return None  # EXIF rotation, CMYK, float...: load_image's rules apply
    return VipsTiles(image, overview_size)


class VipsTiles:
    """Tiles of a file read top to bottom in strips by libvips: holds the rows of the current row of tiles (and
    those still referenced by queued tiles), plus a small overview shrunk from every strip as it passes."""

    def __init__(self, image: Any, overview_size: int = 640):
        if image.bands in (2, 4):
            image = image.extract_band(0, n=image.bands - 1)  # drop alpha, as load_image does
        if image.format == "ushort":
            image = (image >> 8).cast("uchar")  # 16 bits to 8, as load_image does
        if image.bands == 1:
            image = image.bandjoin([image, image])
        else:
            image = image.extract_band(2).bandjoin([image.extract_band(1), image.extract_band(0)])  # RGB -> BGR
        self._image = image
        self.width, self.height = image.width, image.height
        self._band = np.zeros((0, self.width, 3), np.uint8)
        self._band_y0 = 0  # image row of self._band[0]
        scale = min(1.0, overview_size / max(self.width, self.height))
        self._ow, self._oh = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        self._overview = np.zeros((self._oh, self._ow, 3), np.uint8)
        self.rows_read = 0
        self.peak_band_rows = 0

    def _rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0..y1 of the image; reads forward only (tiles come row by row, top to bottom)."""
        end = self._band_y0 + len(self._band)
        if y0 < self._band_y0:
            raise RuntimeError(f"rows {y0}..{y1} were already passed: a strip reader reads top to bottom")
        if y1 > end:
            new = self._fetch(end, y1)
            keep = self._band[max(0, y0 - self._band_y0):] if y0 < end else self._band[:0]
            self._band = np.concatenate([keep, new]) if len(keep) else new
            self._band_y0 = y1 - len(self._band)
            self.peak_band_rows = max(self.peak_band_rows, len(self._band))
        return self._band[y0 - self._band_y0:y1 - self._band_y0]

    def _fetch(self, y0: int, y1: int) -> np.ndarray:
        if y0 != self.rows_read:
            raise RuntimeError(f"strip {y0}..{y1} asked for after row {self.rows_read}: rows must be read in order")
        rows = np.empty((y1 - y0, self.width, 3), np.uint8)
        for y in range(y0, y1, _PIECE_ROWS):  # small pieces: libvips' buffers stay small (a whole strip at once
            h = min(_PIECE_ROWS, y1 - y)     # costs several times the strip in its caches)
            data = self._image.crop(0, y, self.width, h).write_to_memory()
            rows[y - y0:y - y0 + h] = np.frombuffer(data, np.uint8).reshape(h, self.width, 3)
        self.rows_read = y1
        o0, o1 = math.floor(y0 * self._oh / self.height), math.floor(y1 * self._oh / self.height)
        if y1 == self.height:
            o1 = self._oh
        if o1 > o0:
            self._overview[o0:o1] = cv2.resize(rows, (self._ow, o1 - o0), interpolation=cv2.INTER_AREA)
        return rows

    def tiles(self, grid: np.ndarray) -> Iterator[np.ndarray]:
        for x0, y0, x1, y1 in grid:
            yield self._rows(int(y0), int(y1))[:, int(x0):int(x1)]

    def overview(self) -> tuple[np.ndarray, tuple[float, float]]:
        if self.rows_read < self.height:  # no tiles were taken: read the rest for the overview
            for y in range(self.rows_read, self.height, 1024):
                self._fetch(y, min(self.height, y + 1024))
        self._band = self._band[:0]
        return self._overview, (self.width / self._ow, self.height / self._oh)
