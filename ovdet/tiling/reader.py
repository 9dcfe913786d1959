"""Opening an image for tiling: decoded arrays, or (for huge files) a reader that hands out tiles strip by strip."""

from __future__ import annotations

from typing import Any

from ovdet.sources import load_image
from ovdet.tiling.run import ArrayTiles, TileSource


def tile_source(image: Any) -> TileSource:
    """A TileSource for a path, BGR array or PIL image (decoded by load_image's rules); a TileSource is kept."""
    if hasattr(image, "tiles") and hasattr(image, "overview"):
        return image
    return ArrayTiles(load_image(image))
