"""Masks: the segmenter contract, GrabCut from boxes, RLE and polygons both ways (ovdet.masks)."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from ovdet.errors import OVDetWarning, UnknownModelError
from ovdet.masks import MaskPart, Segmenter, create_segmenter
from ovdet.masks import rle
from ovdet.masks.base import paste


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy green backdrop with a red disc and a blue rectangle; their boxes and exact masks."""
    rng = np.random.default_rng(0)
    img = np.clip(np.full((120, 160, 3), (90, 140, 60), np.int16) + rng.integers(-12, 13, (120, 160, 3)), 0, 255)
    img = img.astype(np.uint8)
    truth = np.zeros((2, 120, 160), np.uint8)
    cv2.circle(img, (50, 60), 25, (30, 30, 220), -1)
    cv2.circle(truth[0], (50, 60), 25, 1, -1)
    cv2.rectangle(img, (100, 20), (140, 90), (220, 70, 30), -1)
    cv2.rectangle(truth[1], (100, 20), (140, 90), 1, -1)
    boxes = np.array([[23, 33, 78, 88], [97, 17, 144, 94]], np.float32)
    return img, boxes, truth.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_grabcut_finds_the_objects_inside_their_boxes():
    img, boxes, truth = _scene()
    masks = create_segmenter("grabcut").segment(img, boxes)
    assert masks.shape == (2, 120, 160) and masks.dtype == bool
    for mask, want, (x1, y1, x2, y2) in zip(masks, truth, boxes.astype(int)):
        assert _iou(mask, want) > 0.95  # a filled rectangle would score 0.66 for the disc
        outside = mask.copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any()  # never outside its box
    filled = np.zeros((120, 160), bool)
    filled[33:88, 23:78] = True
    assert _iou(filled, truth[0]) < 0.7  # the trivial baseline grabcut must beat


def test_grabcut_is_the_same_on_every_call_and_per_box():
    img, boxes, _ = _scene()
    seg = create_segmenter("grabcut")
    both = seg.segment(img, boxes)
    assert (seg.segment(img, boxes) == both).all()
    assert (seg.segment(img, boxes[1:]) == both[1:]).all()  # a box's mask does not depend on the other boxes


def test_degenerate_boxes_get_empty_masks_and_a_warning_not_a_crash():
    img, boxes, _ = _scene()
    bad = np.array([[10, 10, 10, 50], [30, 30, 20, 40], [200, 0, 260, 40], [-50, -50, -1, -1],
                    [np.nan, 0, 10, 10]], np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = create_segmenter("grabcut").segment(img, np.concatenate([boxes[:1], bad, boxes[1:]]))
    messages = [str(w.message) for w in caught if issubclass(w.category, OVDetWarning)]
    assert len(messages) == 5 and all("no area inside the 160x120 image" in m for m in messages)
    assert masks.shape == (7, 120, 160)
    assert not masks[1:6].any()
    assert masks[0].sum() > 1500 and masks[6].sum() > 2500  # the good boxes around them are still segmented


def test_a_box_over_the_edge_is_clipped_and_a_tiny_box_filled():
    img, _, truth = _scene()
    masks = create_segmenter("grabcut").segment(img, [[90, -30, 170, 94], [5.2, 5.2, 7.9, 7.1]])
    assert _iou(masks[0], truth[1]) > 0.9
    assert masks[1].sum() == 3 * 3 and masks[1][5:8, 5:8].all()  # under 4 px: the box's pixels, filled


def test_a_box_that_is_the_whole_image():
    img, _, truth = _scene()
    mask = create_segmenter("grabcut").segment(img, [[0, 0, 160, 120]])[0]
    assert 0 < mask.sum() < 160 * 120 and (mask & (truth[0] | truth[1])).sum() > 0.5 * mask.sum()


def test_unknown_segmenter_names_say_what_exists():
    with pytest.raises(UnknownModelError, match="grabcut, mobile_sam, sam2.1_t, sam2.1_b, sam_b"):
        create_segmenter("sam9")
    with pytest.raises(UnknownModelError, match="is a detector model, not a segmenter"):
        create_segmenter("yolov8s-worldv2")
    with pytest.raises(UnknownModelError):
        create_segmenter(3)


def test_a_segmenter_instance_passes_through_and_its_count_is_checked():
    class Short(Segmenter):
        name = "short"

        def _segment(self, image, boxes, rects):
            return []

    seg = Short()
    assert create_segmenter(seg) is seg
    with pytest.raises(RuntimeError, match="returned 0 masks for 1 boxes"):
        seg.segment(np.zeros((8, 8, 3), np.uint8), [[0, 0, 4, 4]])


# ----------------------------------------------------------------------------- RLE and polygons


def test_rle_round_trip_and_pycocotools_agrees():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.random()
        r = rle.encode(mask)
        assert isinstance(r["counts"], str) and r["size"] == [h, w]
        assert (rle.decode(r) == mask).all()
        assert rle.area(r) == mask.sum()
        coco = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert coco["counts"].decode() == r["counts"]


def test_a_crop_encodes_to_the_rle_of_its_pasted_mask():
    rng = np.random.default_rng(2)
    for i in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        crop = rng.random((int(rng.integers(1, h - y + 1)), int(rng.integers(1, w - x + 1)))) < 0.5
        crop[:] = True if i % 9 == 0 else crop  # crops that are all mask, touching the right or bottom edge too
        part = MaskPart(x, y, crop)
        assert rle.encode_part(part, h, w) == rle.encode(paste([part], h, w)[0])
    assert rle.encode_part(MaskPart.empty(), 3, 4) == rle.encode(np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="outside"):
        rle.encode_part(MaskPart(3, 0, np.ones((2, 2), bool)), 4, 4)


@pytest.mark.parametrize("bad", [
    {"size": [10, 10], "counts": "0"},  # runs short of 100 pixels
    {"size": [2, 2], "counts": "5"},  # more pixels than the mask has: pycocotools would write past its buffer
    {"size": [10, 10], "counts": "`"},  # a number cut off
    {"size": [10, 10], "counts": "0\x7f"},  # not an RLE character
    {"size": [10, 10], "counts": [100]},
    {"size": [10], "counts": "0"},
    {"size": [10, 10], "counts": "R3", "extra": 1},
])
def test_malformed_rles_are_refused_before_pycocotools_reads_them(bad):
    assert rle.rle_problem(bad)
    with pytest.raises(ValueError, match="not a mask RLE"):
        rle.decode(bad)


def test_rle_size_must_match_the_image():
    r = rle.encode(np.ones((3, 4), bool))
    assert rle.rle_problem(r, 3, 4) == ""
    assert "not the image's" in rle.rle_problem(r, 4, 3)


def _shapes(seed: int, count: int):
    """Random masks of every kind an outline must survive: noise, blurred blobs (several pieces, holes, one-pixel
    gaps), discs and staircases (cut by the image border or not), one-pixel lines, single pixels."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        h, w = (int(v) for v in rng.integers(1, 36, 2))
        yy, xx = np.mgrid[:h, :w]
        kind = k % 6
        if kind == 0:
            m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        elif kind == 1:
            m = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (5, 5), 0) > rng.uniform(0.45, 0.55)
        elif kind == 2:
            cx, cy, r = rng.uniform(-6, w + 6), rng.uniform(-6, h + 6), rng.uniform(0.3, 20)
            m = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r
        elif kind == 3:
            m = xx * int(rng.integers(1, 4)) <= yy * int(rng.integers(1, 4)) + int(rng.integers(-6, 6))
        elif kind == 4:
            m = np.zeros((h, w), bool)
            m[int(rng.integers(h)), int(rng.integers(w)):] = True
            m[int(rng.integers(h)):, int(rng.integers(w))] = rng.random() < 0.5
        else:
            m = np.zeros((h, w), bool)
            m[int(rng.integers(h)), int(rng.integers(w))] = True
        yield m


def _holes_filled(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region the outside cannot reach (4-connected) filled."""
    frame = np.ascontiguousarray(np.pad(mask, 1), np.uint8)
    cv2.floodFill(frame, None, (0, 0), 2, flags=4)
    return frame[1:-1, 1:-1] != 2


def test_a_polygon_spans_exactly_its_masks_box():
    # the box ultralytics gives a segment label is its polygon's extent: it must be the object's box, not one pixel
    # less (an outline through pixel centres) nor more
    seen = 0
    for mask in _shapes(11, 600):
        poly = rle.mask_polygon(mask)
        assert poly.dtype == np.float64 and poly.ndim == 2 and poly.shape[1] == 2
        if not mask.any():
            assert poly.shape == (0, 2)
            continue
        x, y, w, h = rle.to_bbox(rle.encode(mask))
        assert poly.min(axis=0).tolist() == [x, y] and poly.max(axis=0).tolist() == [x + w, y + h], mask.astype(int)
        seen += 1
    assert seen > 500
    assert rle.mask_polygon(np.ones((1, 1), bool)).tolist() in ([[0, 0], [0, 1], [1, 1], [1, 0]],
                                                                [[0, 0], [1, 0], [1, 1], [0, 1]])
    assert rle.mask_polygon(np.zeros((5, 5), bool)).shape == (0, 2)
    with pytest.raises(ValueError, match="one H×W mask"):
        rle.mask_polygon(np.ones((2, 3, 4), bool))


def test_polygons_redraw_every_mask_exactly_holes_filled():
    pieces = one_piece = 0
    for mask in _shapes(12, 900):
        poly = rle.mask_polygon(mask)
        want = _holes_filled(mask)
        assert (rle.polygon_mask(poly, *mask.shape) == want).all(), (mask.astype(int), poly.tolist())
        count = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
        if count == 1:  # one piece: the outline runs along pixel edges only
            one_piece += 1
            steps = np.diff(np.vstack([poly, poly[:1]]), axis=0)
            assert ((steps[:, 0] == 0) | (steps[:, 1] == 0)).all()
        pieces += count > 1
    assert pieces > 100 and one_piece > 300
    # a one-pixel notch stays open, diagonal neighbours stay apart, a ring keeps its hole filled
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool)
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)
    ring = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    for mask, want in ((u, u), (diagonal, diagonal), (ring, np.ones((3, 3), bool))):
        assert (rle.polygon_mask(rle.mask_polygon(mask), 3, 3) == want).all()


def test_bridges_between_pieces_pass_through_no_pixel_centre():
    # the biggest piece holds the anchor (0, 0); the bridges to the single pixels cross the middle square, and the
    # nearest corner of pixel (33, 33) lies on the diagonal through every pixel centre (k + 0.5, k + 0.5)
    mask = np.zeros((40, 40), bool)
    mask[0:12, 0:12] = True
    mask[14:24, 14:24] = True
    mask[33, 33] = mask[38, 35] = mask[35, 39] = True
    mask[20, 2:5] = True
    poly = rle.mask_polygon(mask)
    assert poly[0].tolist() == [0, 0] and len(poly) > 16
    assert (rle.polygon_mask(poly, 40, 40) == mask).all()


def test_polygon_mask_sets_the_pixels_whose_centres_are_strictly_inside():
    # the diagonal x + y = 2 runs through the centres of pixels (1, 0) and (0, 1): on the edge is outside
    triangle = np.array([[0, 0], [2, 0], [0, 2]], np.float64)
    assert rle.polygon_mask(triangle, 3, 3).astype(int).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    # against a plain even-odd ray test at each centre, on random (self-crossing) polygons with fractional vertices;
    # polygon_mask snaps vertices to 1/256 px, so centres within 0.01 px of an edge are not compared
    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[:24, :30] + 0.5
    compared = 0
    for _ in range(60):
        poly = rng.uniform(-4, 34, (int(rng.integers(3, 9)), 2))
        crossings = np.zeros(xs.shape, int)
        near = np.zeros(xs.shape, bool)
        for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
            spans = (ya <= ys) != (yb <= ys)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
            crossings += spans & (x_at < xs)
            t = np.clip(((xs - xa) * (xb - xa) + (ys - ya) * (yb - ya)) / ((xb - xa) ** 2 + (yb - ya) ** 2), 0, 1)
            near |= np.hypot(xa + t * (xb - xa) - xs, ya + t * (yb - ya) - ys) < 0.01
        got = rle.polygon_mask(poly, 24, 30)
        assert (got == (crossings % 2 == 1))[~near].all()
        compared += int((~near).sum())
    assert compared > 40000
    assert not rle.polygon_mask(np.array([[0, 0], [5, 5]]), 6, 6).any()  # under three points: no area
    assert not rle.polygon_mask(np.array([[-9, -9], [-5, -9], [-5, -5]]), 6, 6).any()  # outside the image
    with pytest.raises(ValueError, match="finite pixel coordinates"):
        rle.polygon_mask(np.array([[0, 0], [np.nan, 3], [3, 3]]), 6, 6)


def test_a_yolo_segment_line_redraws_its_mask_after_six_decimals():
    for mask in _shapes(13, 300):
        if not mask.any():
            continue
        h, w = mask.shape
        line = rle.yolo_segment(0, rle.mask_polygon(mask), [0, 0, w, h], w, h)
        back = np.array(line.split()[1:], np.float64).reshape(-1, 2) * (w, h)
        assert (rle.polygon_mask(back, h, w) == _holes_filled(mask)).all()
