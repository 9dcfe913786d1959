"""Masks as COCO run-length encodings (pycocotools' compressed RLE) and as polygons, both ways.

An RLE is `{"size": [height, width], "counts": "<ascii>"}`, exactly what pycocotools' mask API writes and COCO
`segmentation` holds. `encode_part` encodes a mask crop (ovdet.masks.base.MaskPart) straight into its image's RLE
without a dense image-sized array. `decode` checks an RLE before pycocotools sees it: pycocotools writes runs past
its buffer for counts that add up to more than height × width, and an RLE may come from a journal someone edited.

Polygons are for YOLO segment labels: vertices lie on pixel edges (pixel (x, y) is the square x..x+1, y..y+1), so a
mask's outline spans exactly its box (ultralytics takes a segment label's box to be its extent). `polygon_mask` draws
a polygon back by the pixel-centre rule (a pixel is set when its centre lies strictly inside), which gives back every
mask `mask_polygon` outlines, holes filled: pieces are joined by zero-width bridges that miss every pixel centre.
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
    """One polygon (K×2 float64, pixel-edge x, y) outlining a bool mask: its extent is the mask's box; pieces are
    joined by zero-width bridges from the biggest, holes filled; empty (0×2) for an empty mask."""
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"mask_polygon takes one H×W mask, got shape {m.shape}")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if not rows.size:
        return np.zeros((0, 2), np.float64)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # Each pixel becomes 2×2, so a one-pixel gap stays open to the tracer; the 2× image is framed by one zero pixel.
    # A traced boundary pixel (u, v) of the 2× image is a quadrant of pixel ((u-1)//2, (v-1)//2); its outer corner,
    # a point on the outline, is (u//2, v//2) in crop coordinates.
    big = np.zeros((2 * (y1 - y0) + 2, 2 * (x1 - x0) + 2), np.uint8)
    big[1:-1, 1:-1] = np.repeat(np.repeat(m[y0:y1, x0:x1], 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pieces = [_corners(c.reshape(-1, 2).astype(np.int64) // 2 + (x0, y0)) for c in contours]
    pieces.sort(key=lambda c: -abs(cv2.contourArea(c.astype(np.float32))))
    anchor = pieces[0][0]
    path = [pieces[0]]
    for piece in pieces[1:]:  # back at the anchor, out to the piece, round it, and back the same way
        entry, cycle = _bridge_end(piece, anchor)
        path += [anchor[None], cycle, entry[None]]
    return np.concatenate(path).astype(np.float64)


def _corners(points: np.ndarray) -> np.ndarray:
    """The turning points of a closed path of integer points (repeats and points inside straight runs dropped)."""
    points = points[(points != np.roll(points, 1, axis=0)).any(axis=1)]
    if len(points) < 3:
        return points
    before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    straight = (before[:, 0] * after[:, 1] == before[:, 1] * after[:, 0]) & ((before * after).sum(axis=1) > 0)
    return points[~straight]


def _bridge_end(piece: np.ndarray, anchor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a bridge from `anchor` meets `piece`, and the piece's cycle starting there: the nearest vertex, or point
    one pixel along a vertex's edge, such that the bridge passes through no pixel centre. A segment between integer
    points does so exactly when both its coordinate steps, divided by their gcd, are odd; of two points one pixel
    apart along a horizontal edge (every outline has one) at least one avoids that."""
    step = np.sign(np.roll(piece, -1, axis=0) - piece)
    candidates = np.concatenate([piece, piece + step])
    d = candidates - anchor
    g = np.maximum(np.gcd(d[:, 0], d[:, 1]), 1)
    clear = ~(((d[:, 0] // g) % 2 == 1) & ((d[:, 1] // g) % 2 == 1))
    distance = np.where(clear, (d ** 2).sum(axis=1), np.iinfo(np.int64).max)
    i = int(np.argmin(distance))
    if not clear[i]:
        raise AssertionError("mask_polygon found no bridge clear of pixel centres")  # impossible, see above
    entry = candidates[i]
    if i < len(piece):
        return entry, np.roll(piece, -i, axis=0)
    return entry, np.concatenate([entry[None], np.roll(piece, len(piece) - i - 1, axis=0)])  # after vertex i - K


_SCALE = 256  # polygon_mask snaps vertices to 1/256 px and decides in integers, so a centre on an edge is exact
_REACH = 1 << 19  # px: vertices past this are refused (the integer arithmetic stays inside int64)


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool height×width mask of the pixels whose centres (x + 0.5, y + 0.5) lie strictly inside the polygon
    (pixel-edge coordinates, as mask_polygon writes; even-odd rule, so a bridge there and back adds nothing). Vertices
    are snapped to 1/256 px, so the decision is exact; only the polygon's box is worked on."""
    out = np.zeros((height, width), bool)
    p = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(p) < 3 or not height or not width:
        return out
    if not np.isfinite(p).all() or np.abs(p).max() > _REACH:
        raise ValueError(f"polygon vertices must be finite pixel coordinates within ±{_REACH}, got "
                         f"{p[~np.isfinite(p).all(axis=1) | (np.abs(p) > _REACH).any(axis=1)][0].tolist()}")
    bx0, by0 = np.maximum(np.floor(p.min(axis=0)).astype(int), 0)
    bx1, by1 = np.minimum(np.ceil(p.max(axis=0)).astype(int), (width, height))
    if bx0 >= bx1 or by0 >= by1:
        return out
    s, half = _SCALE, _SCALE // 2
    q = np.round(p * s).astype(np.int64)
    a, b = q, np.roll(q, -1, axis=0)
    down = a[:, 1] < b[:, 1]
    top, bottom = np.where(down[:, None], a, b), np.where(down[:, None], b, a)
    top, bottom = top[top[:, 1] != bottom[:, 1]], bottom[top[:, 1] != bottom[:, 1]]
    # Rows whose centre line Y = (y + 0.5)·s an edge crosses, top <= Y < bottom (a vertex on a row centre counts once)
    r0 = np.clip(-((half - top[:, 1]) // s), by0, by1)
    r1 = np.clip(-((half - bottom[:, 1]) // s), by0, by1)
    n = np.maximum(r1 - r0, 0)
    edge = np.repeat(np.arange(len(top)), n)
    row = r0[edge] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    xa, ya, xb, yb = top[edge, 0], top[edge, 1], bottom[edge, 0], bottom[edge, 1]
    dy = yb - ya
    # The crossing is at x = num / dy (scaled); pixel x's centre is right of it when (2x + 1)·half·dy > num.
    t = xa * dy + ((2 * row + 1) * half - ya) * (xb - xa) - half * dy
    first = t // (s * dy) + 1
    cols = bx1 - bx0
    flips = np.zeros((by1 - by0, cols + 1), np.uint8)  # only the parity counts: a byte a pixel, wrapping is fine
    np.add.at(flips, (row - by0, np.clip(first - bx0, 0, cols)), 1)
    inside = np.bitwise_xor.accumulate(flips & 1, axis=1)[:, :cols].astype(bool)
    on = t % (s * dy) == 0  # the centre of pixel first - 1 lies on the edge
    _clear(inside, row[on] - by0, first[on] - 1 - bx0)
    on_centre = ((q - half) % s == 0).all(axis=1)  # vertices on a pixel centre
    _clear(inside, (q[on_centre, 1] - half) // s - by0, (q[on_centre, 0] - half) // s - bx0)
    level = (a[:, 1] == b[:, 1]) & ((a[:, 1] - half) % s == 0)  # horizontal edges along a row centre line
    for (xa_, y_), (xb_, _) in zip(a[level].tolist(), b[level].tolist()):
        c0, c1 = -((half - min(xa_, xb_)) // s), (max(xa_, xb_) - half) // s
        _clear(inside, np.full(max(c1 - c0 + 1, 0), (y_ - half) // s - by0), np.arange(c0, c1 + 1) - bx0)
    out[by0:by1, bx0:bx1] = inside
    return out


def _clear(inside: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Unset the pixels (rows[i], cols[i]) that lie in `inside`."""
    keep = (rows >= 0) & (rows < inside.shape[0]) & (cols >= 0) & (cols < inside.shape[1])
    inside[rows[keep], cols[keep]] = False


def yolo_segment(class_id: int, polygon: np.ndarray, box: Sequence[float], width: int, height: int) -> str:
    """A YOLO segment label line "class x1 y1 x2 y2 ..." (0..1, 6 decimals): the polygon, or the box's corners when
    the polygon has under 3 points (an empty mask), so that every box keeps a trainable label."""
    if len(polygon) < 3:
        x1, y1, x2, y2 = box
        polygon = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)
    norm = np.asarray(polygon, np.float64) / (width, height)
    return f"{int(class_id)} " + " ".join(f"{v:.6f}" for v in norm.reshape(-1).tolist()) + "\n"
