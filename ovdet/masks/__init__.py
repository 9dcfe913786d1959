"""Instance masks from boxes: a segmenter (GrabCut, or ultralytics' SAM family) turns each box into a bool mask.

`create_segmenter("grabcut")` (or "mobile_sam", "sam2.1_t", "sam2.1_b", "sam_b") returns a `Segmenter`;
`segmenter.segment(image, boxes)` gives one bool H×W mask per box in the image's pixels. ovdet.masks.rle turns masks
into COCO run-length encodings and polygons and back. Imports are lazy: `ovdet.masks.names` stays stdlib only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MaskPart", "Segmenter", "create_segmenter"]


def __getattr__(name: str) -> Any:
    if name == "create_segmenter":
        from ovdet.masks.table import create_segmenter

        return create_segmenter
    if name in __all__:
        from ovdet.masks import base

        return getattr(base, name)
    raise AttributeError(f"module 'ovdet.masks' has no attribute {name!r}")
