"""Masks as COCO run-length encodings (pycocotools' compressed RLE) and as polygons, both ways.

An RLE is `{"size": [height, width], "counts": "<ascii>"}`, exactly what pycocotools' mask API writes and COCO
`segmentation` holds. `encode_part` encodes a mask crop (ovdet.masks.base.MaskPart) straight into its image's RLE
without a dense image-sized array. `decode` checks an RLE before pycocotools sees it: pycocotools writes runs past
its buffer for counts that add up to more than height × width, and an RLE may come from a journal someone edited.

Polygons are for YOLO segment labels: vertices are pixel centres (x + 0.5, y + 0.5) of the mask's outline, so that
rasterising them back (`polygon_mask`, and ultralytics' int-truncating loader) lands on the same pixels. A one-piece
mask without holes comes back exactly; pieces are joined by zero-width bridges (rasterised as one-pixel lines) and
holes are filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from ovdet.masks.base import MaskPart

__all__ = ["DATA_KEY", "area", "decode", "encode", "encode_part", "mask_polygon", "polygon_mask", "rle_problem",
           "to_bbox", "yolo_segment"]

Rle = dict[str, Any]
DATA_KEY = "mask_rle"  # sv.Detections.data key of the masks as RLEs (OVDetector.detect_batch(mask_rle=True))


def encode(mask: np.ndarray) -> Rle:
    """The compressed RLE of one bool H×W mask (counts as a str, ready for JSON)."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"encode takes one H×W mask, got shape {m.shape}")
    rle = coco_mask.encode(m)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_part(part: MaskPart, height: int, width: int) -> Rle:
    """The RLE, in a height×width image, of a mask given as a crop at (part.x, part.y); the crop must lie inside."""
    h, w = part.mask.shape
    if not (h and w):
        height, width = int(height), int(width)
        return {"size": [height, width], "counts": _compress([height * width], height, width)}
    if part.x < 0 or part.y < 0 or part.x + w > width or part.y + h > height:
        raise ValueError(f"mask crop {w}x{h} at ({part.x}, {part.y}) is outside the {width}x{height} image")
    columns = np.zeros((w, height), bool)  # the crop's image columns, whole, in column-major order
    columns[:, part.y:part.y + h] = np.asarray(part.mask, bool).T
    flat = columns.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges)
    if flat[0]:  # counts start with a run of zeros
        runs = np.concatenate([[0], runs])
    runs[0] += part.x * height  # the all-zero columns left of the crop
    if len(runs) % 2:  # ends with zeros: the columns right of the crop extend that run
        runs[-1] += (width - part.x - w) * height
    elif part.x + w < width:
        runs = np.concatenate([runs, [(width - part.x - w) * height]])
    height, width = int(height), int(width)
    return {"size": [height, width], "counts": _compress(runs.tolist(), height, width)}


def _compress(counts: Sequence[int], height: int, width: int) -> str:
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    return rle["counts"].decode("ascii")


def _runs(counts: str) -> np.ndarray | None:
    """The run lengths a compressed counts string holds (pycocotools' rleFrString, vectorised), or None when the
    string is not a well-formed one."""
    if not counts:
        return np.zeros(0, np.int64)
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError:
        return None
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if c.min() < 0 or c.max() > 63:
        return None
    more = (c & 0x20) != 0
    if more[-1]:
        return None  # the last number is cut off
    last = np.flatnonzero(~more)  # each number ends at a character without the continuation bit
    starts = np.concatenate([[0], last[:-1] + 1])
    lengths = last - starts + 1
    if lengths.max() > 11:  # more than 55 bits: no run of a real mask
        return None
    group = np.repeat(np.arange(len(last)), lengths)
    k = np.arange(len(c)) - starts[group]
    values = np.zeros(len(last), np.int64)
    np.add.at(values, group, (c & 0x1F) << (5 * k))
    negative = (c[last] & 0x10) != 0
    values[negative] |= -1 << (5 * lengths[negative])
    runs = values.copy()  # from the fourth number on, each is a difference to the number two before it
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_problem(rle: Any, height: int | None = None, width: int | None = None) -> str:
    """Why `rle` is not a compressed RLE of a height×width mask (either may be None: any), or "" when it is."""
    if type(rle) is not dict or set(rle) != {"size", "counts"}:
        return "is not an object with exactly 'size' and 'counts'"
    size = rle["size"]
    if type(size) is not list or len(size) != 2 or not all(type(v) is int and 0 < v < 1 << 31 for v in size):
        return "has a 'size' that is not [height, width] in pixels"
    if (height is not None and size[0] != height) or (width is not None and size[1] != width):
        return f"has size {size}, not the image's [{height}, {width}]"
    if type(rle["counts"]) is not str:
        return "has 'counts' that are not a compressed RLE string"
    runs = _runs(rle["counts"])
    if runs is None or (runs < 0).any() or int(runs.sum()) != size[0] * size[1]:
        return "has 'counts' that do not describe size[0] × size[1] pixels"
    return ""


def _checked(rle: Any) -> dict[str, Any]:
    problem = rle_problem(rle)
    if problem:
        raise ValueError(f"not a mask RLE: it {problem}")
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def decode(rle: Rle) -> np.ndarray:
    """The bool H×W mask of an RLE (ValueError for one that is not well formed)."""
    return coco_mask.decode(_checked(rle)).astype(bool)


def area(rle: Rle) -> int:
    """Pixels in the mask."""
    return int(coco_mask.area(_checked(rle)))


def to_bbox(rle: Rle) -> list[float]:
    """The mask's bounding box, COCO xywh (zeros for an empty mask)."""
    return [float(v) for v in coco_mask.toBbox(_checked(rle))]


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """One polygon (K×2 float, pixel-centre x, y) outlining a bool mask; pieces joined by bridges, holes filled;
    empty (0×2) for an empty mask."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pieces = sorted((c.reshape(-1, 2) for c in contours), key=lambda c: -cv2.contourArea(c.astype(np.float32)))
    if not pieces:
        return np.zeros((0, 2), np.float64)
    anchor = pieces[0][0]
    path = [pieces[0], anchor[None]]
    for piece in pieces[1:]:  # out from the anchor to the nearest vertex, round the piece, and back
        j = int(np.argmin(((piece - anchor) ** 2).sum(axis=1)))
        path += [np.roll(piece, -j, axis=0), piece[j][None], anchor[None]]
    return np.concatenate(path).astype(np.float64) + 0.5


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool height×width mask with the polygon (pixel-centre coordinates, as mask_polygon writes) filled."""
    out = np.zeros((height, width), np.uint8)
    pts = np.floor(np.asarray(polygon, np.float64).reshape(-1, 2)).astype(np.int32)
    if len(pts):
        cv2.fillPoly(out, [pts], 1)
    return out.astype(bool)


def yolo_segment(class_id: int, polygon: np.ndarray, box: Sequence[float], width: int, height: int) -> str:
    """A YOLO segment label line "class x1 y1 x2 y2 ..." (0..1, 6 decimals): the polygon, or the box's corners when
    the polygon has under 3 points (an empty or one-line mask), so that every box keeps a trainable label."""
    if len(polygon) < 3:
        x1, y1, x2, y2 = box
        polygon = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)
    norm = np.asarray(polygon, np.float64) / (width, height)
    return f"{int(class_id)} " + " ".join(f"{v:.6f}" for v in norm.reshape(-1).tolist()) + "\n"
