"""Sliced (tiled) inference: small objects in large images, batched tiles, merged boxes; wraps any batch detector."""

from ovdet.tiling.grid import TileSpec, tile_grid, tile_spec
from ovdet.tiling.merge import greedy_groups, merge_detections
from ovdet.tiling.reader import tile_source
from ovdet.tiling.run import ArrayTiles, TileSource, detect_tiled

__all__ = ["ArrayTiles", "TileSource", "TileSpec", "detect_tiled", "greedy_groups", "merge_detections", "tile_grid",
           "tile_source", "tile_spec"]
