"""Letterbox, class scores, NMS and box scaling in numpy + OpenCV, equal to ovdet's and ultralytics' torch code."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

MAX_NMS = 30000  # ultralytics: at most this many boxes (the highest scores) go into NMS
MAX_WH = 7680  # ultralytics: class offset in pixels, so that boxes of different classes never overlap
_BLOCK = 512  # NMS with many overlaps compares boxes in blocks of this many (memory: a few block² matrices)
_PAIR_COST = 8  # measured: checking one listed pair of boxes costs about as much as 8 cells of a block matrix


def letterbox(images: list[np.ndarray], imgsz: int, stride: int) -> np.ndarray:
    """BGR uint8 HxWx3 images → a C-contiguous float32 [B, 3, H, W] RGB batch in 0..1, equal to ultralytics'
    LetterBox((imgsz, imgsz), auto=<all images the same shape>, stride=stride) then HWC→CHW, BGR→RGB, /255."""
    auto = len({im.shape for im in images}) == 1  # one shape: minimal rectangle padding, as ultralytics predict does
    boxed = [_letterbox_one(im, imgsz, stride, auto) for im in images]
    out = np.empty((len(boxed), 3, *boxed[0].shape[:2]), np.float32)
    for b, im in enumerate(boxed):
        planes = cv2.split(im)
        for c in range(3):  # a float32 division, as torch's div_(255): not a multiplication by 1/255
            np.divide(planes[2 - c], np.float32(255), out=out[b, c])
    return out


def _letterbox_one(im: np.ndarray, imgsz: int, stride: int, auto: bool) -> np.ndarray:
    """LetterBox.get_params and apply_image (center=True, scaleup=True, scale_fill=False), step for step."""
    h, w = im.shape[:2]
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)  # Python round: half to even, as ultralytics
    dw, dh = imgsz - new_w, imgsz - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if (w, h) != (new_w, new_h):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))


def class_scores(preds: np.ndarray | Sequence[np.ndarray], conf: float, columns: np.ndarray | None,
                 num_classes: int, reduce: str = "max",
                 class_conf: Sequence[float] | None = None) -> tuple[np.ndarray, float]:
    """Raw head output [B, 4+K, A] → [B, 4+C, A] class scores and NMS's conf threshold: WorldDetector.class_scores.

    `columns[k]` is row k's class (-1: a negative prompt; None: row k is class k). A class scores the max or mean
    (`reduce`) of its rows; anchors whose best row is a negative (ties included) get all-zero scores, and so do anchors
    whose best class scores at or below that class's `class_conf`, which then replaces `conf` by its minimum.
    """
    preds = np.asarray(preds[0] if isinstance(preds, (list, tuple)) else preds)
    xywh, scores = preds[:, :4], preds[:, 4:]
    if columns is not None:
        columns = np.asarray(columns, np.int64)
        positive = columns >= 0
        rows, cls = scores[:, positive], columns[positive]
        order = np.argsort(cls, kind="stable")
        rank = np.empty_like(order)  # each row's place among its class's rows
        rank[order] = np.arange(len(order)) - np.searchsorted(cls[order], cls[order])
        # torch's scatter_reduce goes through the rows in order from the identity (0 or -inf); a class's sum is then
        # summed in row order (numpy's reductions may not: pairwise, reduceat), and its mean divides by the count
        op = np.maximum if reduce == "max" else np.add
        reduced = np.full((scores.shape[0], num_classes, scores.shape[2]), -np.inf if reduce == "max" else 0,
                          scores.dtype)
        for place in range(int(rank.max()) + 1 if len(rank) else 0):
            at = rank == place
            reduced[:, cls[at]] = op(reduced[:, cls[at]], rows[:, at])
        counts = np.bincount(cls, minlength=num_classes)
        reduced[:, counts == 0] = 0  # a class without rows keeps torch's zeros
        if reduce != "max":
            reduced /= np.maximum(counts, 1).astype(scores.dtype)[:, None]
        if not positive.all():
            beaten = scores[:, ~positive].max(1) >= rows.max(1)
            reduced = np.where(beaten[:, None], reduced.dtype.type(0), reduced)
        scores = reduced
    if class_conf is not None:
        thresholds = np.asarray(class_conf, dtype=scores.dtype)
        below = scores.max(1) <= thresholds[scores.argmax(1)]
        scores = np.where(below[:, None], scores.dtype.type(0), scores)
        conf = float(min(class_conf))
    return np.concatenate((xywh, scores), 1), conf


def non_max_suppression(preds: np.ndarray | Sequence[np.ndarray], conf: float, iou: float,
                        max_det: int = 300) -> list[np.ndarray]:
    """[B, 4+C, A] (xywh, class scores) → per image an N×6 float32 array (x1, y1, x2, y2, score, class), equal to
    ultralytics' non_max_suppression(preds, conf, iou, max_det=max_det) with torchvision's NMS (best class per box,
    class-aware, at most MAX_NMS boxes in, greedy in descending score, at most max_det out)."""
    preds = np.asarray(preds[0] if isinstance(preds, (list, tuple)) else preds, dtype=np.float32)
    thr = np.float32(conf)  # torch compares a float32 tensor with a Python float in float32
    # torchvision compares the float32 IoU with the threshold as a double: v > iou ⟺ v > the largest float32 <= iou
    iou_thr = np.float32(iou) if float(np.float32(iou)) <= iou else np.nextafter(np.float32(iou), np.float32(-1))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # inf and NaN boxes pass as in torch
        return [_nms_one(p, thr, iou_thr, max_det) for p in preds]


def _nms_one(p: np.ndarray, thr: np.float32, iou_thr: np.float32, max_det: int) -> np.ndarray:
    """One image's [4+C, A] predictions → its N×6 detections."""
    scores = p[4:]
    cand = np.flatnonzero(scores.max(0) > thr)
    if not cand.size:
        return np.zeros((0, 6), np.float32)
    cls = scores[:, cand].argmax(0)
    score = scores[cls, cand]
    xy, half = p[:2, cand].T, p[2:4, cand].T / np.float32(2)
    det = np.concatenate((xy - half, xy + half, score[:, None], cls[:, None].astype(np.float32)), 1)
    if len(det) > MAX_NMS:  # ultralytics' cut is torch's unstable sort: equal scores keep its order
        det = det[_torch_argsort_desc(score)[:MAX_NMS]]
    else:  # torchvision sorts stably: equal scores keep anchor order
        det = det[np.argsort(-det[:, 4], kind="stable")]
    return det[_greedy_nms(det[:, :4] + det[:, 5:6] * np.float32(MAX_WH), iou_thr, max_det)]


def _greedy_nms(boxes: np.ndarray, iou_thr: np.float32, max_det: int) -> np.ndarray:
    """Indices of the first `max_det` boxes that torchvision's CPU nms keeps, the boxes already in its order: a box is
    kept unless an earlier kept box overlaps it by IoU > iou_thr.

    Only pairs that overlap in x can suppress (boxes sorted by x1: a box's right edge bounds the run of boxes that
    start before it), so only those are checked when they are few; else blocks of boxes are checked against the boxes
    kept before them and among themselves."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    n = len(boxes)
    by_x = np.argsort(boxes[:, 0], kind="stable")
    counts = np.maximum(np.searchsorted(boxes[by_x, 0], boxes[by_x, 2]) - np.arange(1, n + 1), 0)
    total = int(counts.sum())
    if total * _PAIR_COST > min(n, 2 * _BLOCK) ** 2:  # blocks then cost less (and stop at max_det kept)
        return _greedy_blocks(boxes, areas, iou_thr, max_det)
    first = np.repeat(np.arange(n), counts)
    a, b = by_x[first], by_x[np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + first + 1]
    earlier, later = np.minimum(a, b), np.maximum(a, b)
    over = _over(boxes[earlier], areas[earlier], boxes[later], areas[later], iou_thr)
    earlier, later = earlier[over], later[over]
    order = np.argsort(earlier, kind="stable")
    earlier, later = earlier[order], later[order]
    suppressed = np.zeros(n, bool)
    heads = np.unique(earlier)  # the boxes that would suppress some later box, in torchvision's order
    for i, lo, hi in zip(heads.tolist(), np.searchsorted(earlier, heads).tolist(),
                         np.searchsorted(earlier, heads, "right").tolist()):
        if not suppressed[i]:
            suppressed[later[lo:hi]] = True
    return np.flatnonzero(~suppressed)[:max_det]


def _greedy_blocks(boxes: np.ndarray, areas: np.ndarray, iou_thr: np.float32, max_det: int) -> np.ndarray:
    """_greedy_nms in blocks of _BLOCK boxes, stopping at max_det kept: memory stays a few block² matrices."""
    kept = np.zeros(0, np.int64)
    for start in range(0, len(boxes), _BLOCK):
        block = np.arange(start, min(start + _BLOCK, len(boxes)))
        alive = ~_over(boxes[kept][:, None], areas[kept][:, None], boxes[block], areas[block], iou_thr).any(0)
        inner = np.triu(_over(boxes[block][:, None], areas[block][:, None], boxes[block], areas[block], iou_thr), 1)
        keep = alive
        for i in np.flatnonzero(inner.any(1)).tolist():
            if keep[i]:
                keep &= ~inner[i]
        kept = np.concatenate((kept, block[keep]))
        if len(kept) >= max_det:
            break
    return kept[:max_det]


def _over(a: np.ndarray, area_a: np.ndarray, b: np.ndarray, area_b: np.ndarray, iou_thr: np.float32) -> np.ndarray:
    """IoU(a, b) > iou_thr for xyxy boxes (broadcast), in float32 as torchvision computes it (a: the earlier box)."""
    w = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), np.float32(0))
    h = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), np.float32(0))
    inter = w * h
    return inter / (area_a + area_b - inter) > iou_thr  # NaN (0/0, NaN boxes) is no overlap, as in torchvision


def _torch_argsort_desc(keys: np.ndarray) -> np.ndarray:
    """torch's CPU argsort(descending=True) (stable=False) of non-NaN keys: libstdc++'s std::sort (introsort).

    Only the order of equal keys depends on the algorithm, so this replays its partitions (vectorized) only where
    equal keys are, then ends with a stable sort as its final insertion sort does."""
    n = len(keys)
    values, counts = np.unique(keys, return_counts=True)
    if n <= 16 or len(values) == n:  # std::sort of ≤16 is an insertion sort: stable
        return np.argsort(-keys, kind="stable")
    k, perm = keys.copy(), np.arange(n)
    shared = counts[np.searchsorted(values, k)] > 1  # travels with its key: ranges without two of them need no replay
    stack = [(0, n, 2 * (n.bit_length() - 1))]
    while stack:
        first, last, depth = stack.pop()
        while last - first > 16 and np.count_nonzero(shared[first:last]) > 1:
            if depth == 0:
                _heap_sort(k, perm, shared, first, last)
                break
            depth -= 1
            x, y, z = first + 1, first + (last - first) // 2, last - 1  # median of three, moved to first
            if k[x] > k[y]:
                s = y if k[y] > k[z] else z if k[x] > k[z] else x
            else:
                s = x if k[x] > k[z] else z if k[y] > k[z] else y
            for arr in (k, perm, shared):
                arr[[first, s]] = arr[[s, first]]
            pivot = k[first]
            # Hoare partition: the i-th key from the left not above the pivot swaps with the i-th from the right
            # not below it while they have not crossed; swapped places are never scanned again before the end.
            left = first + 1 + np.flatnonzero(k[first + 1:last] <= pivot)
            right = first + np.flatnonzero(k[first:last] >= pivot)[::-1]
            m = min(len(left), len(right))
            crossed = np.flatnonzero(left[:m] >= right[:m])
            swaps = crossed[0] if len(crossed) else m
            cut = min(left[swaps] if swaps < len(left) else last, right[swaps - 1] if swaps else last)
            a, b = left[:swaps], right[:swaps]
            for arr in (k, perm, shared):
                arr[a], arr[b] = arr[b], arr[a].copy()
            stack.append((cut, last, depth))
            last = cut
    return perm[np.argsort(-k, kind="stable")]


def _heap_sort(k: np.ndarray, perm: np.ndarray, shared: np.ndarray, first: int, last: int) -> None:
    """std::partial_sort(first, last, last) with the descending comparator: make_heap then sort_heap, in place."""
    items = list(zip(k[first:last].tolist(), perm[first:last].tolist(), shared[first:last].tolist()))
    n = len(items)

    def adjust(hole: int, length: int, value: tuple) -> None:  # std::__adjust_heap then std::__push_heap
        top, child = hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if items[child][0] > items[child - 1][0]:  # comp(child, child - 1): a min-heap of keys
                child -= 1
            items[hole], hole = items[child], child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            items[hole], hole = items[child - 1], child - 1
        parent = (hole - 1) // 2
        while hole > top and items[parent][0] > value[0]:
            items[hole], hole = items[parent], parent
            parent = (hole - 1) // 2
        items[hole] = value

    for parent in range((n - 2) // 2, -1, -1):
        adjust(parent, n, items[parent])
    for end in range(n - 1, 0, -1):
        value, items[end] = items[end], items[0]
        adjust(0, end, value)
    for arr, col in zip((k, perm, shared), zip(*items)):
        arr[first:last] = col


def scale_boxes(letterboxed_hw: tuple[int, int], boxes: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """xyxy boxes in the letterboxed image → float32 boxes in the original image's pixels, clipped to it (equal to
    ultralytics.utils.ops.scale_boxes on a float32 tensor)."""
    h1, w1 = letterboxed_hw[:2]
    h0, w0 = image_shape[:2]
    gain = min(h1 / h0, w1 / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    pad_x, pad_y = round((w1 - new_w) / 2 - 0.1), round((h1 - new_h) / 2 - 0.1)
    out = np.array(boxes, dtype=np.float32)  # torch computes in float32: the Python scalars become float32
    out[..., [0, 2]] -= np.float32(pad_x)
    out[..., [1, 3]] -= np.float32(pad_y)
    out[..., [0, 2]] /= np.float32(new_w / w0)
    out[..., [1, 3]] /= np.float32(new_h / h0)
    out[..., [0, 2]] = out[..., [0, 2]].clip(np.float32(0), np.float32(w0))
    out[..., [1, 3]] = out[..., [1, 3]].clip(np.float32(0), np.float32(h0))
    return out
