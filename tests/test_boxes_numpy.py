"""ovdet.model.boxes (numpy + OpenCV, no torch) equals the torch / ultralytics code it stands in for, bit for bit:
letterbox, class scores, NMS and scale_boxes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
# Imported on purpose: ultralytics' non_max_suppression runs torchvision.ops.nms when "torchvision" is in sys.modules
# (as in ultralytics' own predict, whose AutoBackend imports it), else its TorchNMS, which sorts scores unstably (equal
# scores in another order) and compares IoU with the threshold in float32. Every NMS reference here is torchvision's.
import torchvision  # noqa: F401
from ultralytics.data.augment import LetterBox
from ultralytics.utils import nms, ops

from ovdet.model import boxes
from ovdet.model.world import WorldDetector


@pytest.fixture(scope="module")
def detector():
    """A real (random-weight) detector on the CPU: its preprocess is the torch letterbox boxes.letterbox replaces."""
    return WorldDetector.load("yolov8s-worldv2.yaml", device="cpu", backend="torch")


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bits (so -0.0 != 0.0 and NaN == NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# --- letterbox -------------------------------------------------------------------------------------------------------

SHAPES = [(640, 640), (480, 640), (640, 480), (720, 1280), (1280, 720), (37, 101), (101, 37), (1, 1), (3, 500),
          (500, 3), (1, 640), (2000, 1500), (7, 9), (641, 639), (333, 777), (320, 320)]


def reference_letterbox(images, imgsz, stride):
    """WorldDetector.preprocess's torch code for a CPU float32 detector, with any stride."""
    letterbox = LetterBox((imgsz, imgsz), auto=len({im.shape for im in images}) == 1, stride=stride)
    batch = torch.from_numpy(np.stack([letterbox(image=im) for im in images]))
    return batch.permute(0, 3, 1, 2).flip(1).float().div_(255).numpy()


@pytest.mark.parametrize("imgsz", [320, 640, 641])
def test_letterbox_equals_detector_preprocess(detector, imgsz):
    rng = np.random.default_rng(imgsz)
    for shape in SHAPES:
        image = rng.integers(0, 256, (*shape, 3), np.uint8)
        ours = boxes.letterbox([image], imgsz, detector.stride)
        assert ours.dtype == np.float32 and ours.flags.c_contiguous
        assert bits_equal(ours, detector.preprocess([image], imgsz).numpy()), (shape, imgsz)


def test_letterbox_batches_equal_detector_preprocess(detector):
    rng = np.random.default_rng(1)
    same = [rng.integers(0, 256, (300, 500, 3), np.uint8) for _ in range(3)]  # one shape: minimal rectangle (auto)
    ours = boxes.letterbox(same, 640, detector.stride)
    assert ours.shape == (3, 3, 384, 640)
    assert bits_equal(ours, detector.preprocess(same, 640).numpy())
    mixed = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(300, 500), (500, 300), (37, 101)]]
    ours = boxes.letterbox(mixed, 640, detector.stride)  # shapes differ: every image padded to imgsz²
    assert ours.shape == (3, 3, 640, 640)
    assert bits_equal(ours, detector.preprocess(mixed, 640).numpy())


def test_letterbox_random_shapes_sizes_and_strides():
    rng = np.random.default_rng(7)
    for _ in range(40):
        imgsz, stride = int(rng.choice([32, 100, 320, 416, 640, 641, 1280])), int(rng.choice([32, 64]))
        count = int(rng.integers(1, 4))
        shape = tuple(int(v) for v in rng.integers(1, 1500, 2))
        shapes = [shape] * count if rng.random() < 0.5 else [tuple(int(v) for v in rng.integers(1, 1500, 2))
                                                            for _ in range(count)]
        images = [rng.integers(0, 256, (*s, 3), np.uint8) for s in shapes]
        assert bits_equal(boxes.letterbox(images, imgsz, stride), reference_letterbox(images, imgsz, stride)), \
            (shapes, imgsz, stride)


def test_letterbox_pads_with_114_around_the_centred_image():
    image = np.full((37, 101, 3), (10, 20, 30), np.uint8)  # BGR
    out = boxes.letterbox([image], 640, 32)[0]
    # 640 / 101: 640 × 234 (37 × 6.34 = 234.46), padding 406 % 32 = 22 rows, 11 above and 11 below
    assert out.shape == (3, 256, 640)
    pad, colour = np.float32(114) / np.float32(255), np.float32([30, 20, 10]) / np.float32(255)  # RGB
    assert np.all(out[:, :11] == pad) and np.all(out[:, 245:] == pad)
    assert np.all(out[:, 11:245] == colour[:, None, None])


# --- class scores ----------------------------------------------------------------------------------------------------

def reference_class_scores(preds, conf, columns, num_classes, reduce, class_conf):
    """WorldDetector.class_scores, called unbound on what it reads from the detector."""
    owner = SimpleNamespace(_columns=columns, num_classes=num_classes, _reduce=reduce)
    out, conf = WorldDetector.class_scores(owner, torch.from_numpy(preds), conf, class_conf)
    return out.numpy(), conf


def test_class_scores_equal_the_torch_code():
    """Bit for bit, mean included: both sum a class's rows in row order (torch's CPU scatter does; numpy's own
    reductions may not, which is why boxes sums them one row after another)."""
    rng = np.random.default_rng(3)
    checked = 0
    for case in range(150):
        rows = int(rng.integers(1, 14))
        classes = int(rng.integers(1, rows + 1))
        columns = np.concatenate([np.arange(classes), rng.integers(-1, classes, rows - classes)])
        rng.shuffle(columns)
        if case % 5 == 0:
            columns, classes = None, rows
        preds = rng.random((int(rng.integers(1, 3)), 4 + rows, int(rng.integers(1, 200)))).astype(np.float32)
        if case % 3 == 0:
            preds[:, 4:] = np.round(preds[:, 4:] * 4) / 4  # ties: a negative as high as a class, scores at thresholds
        class_conf = None if case % 2 else [float(v) for v in np.round(rng.random(classes) * 4) / 4]
        for reduce in ("max", "mean"):
            if columns is None and class_conf is None:
                continue
            ours = boxes.class_scores(preds, 0.25, columns, classes, reduce, class_conf)
            ref = reference_class_scores(preds, 0.25, columns, classes, reduce, class_conf)
            assert bits_equal(ours[0], ref[0]) and ours[1] == ref[1], (case, reduce, columns, class_conf)
            checked += 1
    assert checked > 200


def test_class_scores_rules():
    # anchors: 0 positive best, 1 negative ties the best positive, 2 negative beats, 3 class 1 at its threshold
    scores = np.float32([[0.9, 0.5, 0.2, 0.1],    # row 0: class 0
                         [0.1, 0.6, 0.1, 0.3],    # row 1: class 1
                         [0.3, 0.6, 0.8, 0.2],    # row 2: negative
                         [0.3, 0.2, 0.1, 0.5]])   # row 3: class 1
    preds = np.concatenate([np.ones((4, 4), np.float32), scores])[None]
    out, conf = boxes.class_scores(preds, 0.25, np.array([0, 1, -1, 1]), 2, "max", [0.2, 0.5])
    assert conf == 0.2
    assert np.array_equal(out[0, 4:], np.float32([[0.9, 0, 0, 0], [0.3, 0, 0, 0]]))
    out, _ = boxes.class_scores(preds, 0.25, np.array([0, 1, -1, 1]), 2, "mean", None)
    assert np.array_equal(out[0, 4:, 3], np.float32([0.1, 0.4]))
    assert np.array_equal(out[0, :4], preds[0, :4])
    assert bits_equal(boxes.class_scores([preds], 0.25, np.array([0, 1, -1, 1]), 2, "mean", None)[0], out)  # a list


# --- NMS -------------------------------------------------------------------------------------------------------------

def random_preds(rng, batch, classes, anchors, objects, spread=6.0, noise=0.3, quant=None):
    """[batch, 4 + classes, anchors]: boxes clustered around `objects` objects, each scoring high for one class;
    `quant` rounds the scores to 1/quant, so that many are exactly equal."""
    preds = np.empty((batch, 4 + classes, anchors), np.float32)
    for b in range(batch):
        centres, sizes = rng.random((objects, 2)) * 600 + 20, rng.random((objects, 2)) * 150 + 10
        obj = rng.integers(0, objects, anchors)
        preds[b, :2] = (centres[obj] + rng.normal(0, spread, (anchors, 2))).T
        preds[b, 2:4] = (sizes[obj] * rng.uniform(0.8, 1.2, (anchors, 2))).T
        scores = rng.uniform(0, noise, (classes, anchors))
        scores[rng.integers(0, classes, objects)[obj], np.arange(anchors)] += rng.random(anchors) * 0.7
        preds[b, 4:] = np.round(scores * quant) / quant if quant else scores
    return preds


def reference_nms(preds, conf, iou, max_det):
    assert "torchvision" in sys.modules  # the reference is torchvision.ops.nms (see the import above)
    return [d.numpy() for d in nms.non_max_suppression(torch.from_numpy(preds.copy()), conf, iou, max_det=max_det)]


def assert_same_detections(preds, conf, iou, max_det):
    ours, ref = boxes.non_max_suppression(preds, conf, iou, max_det), reference_nms(preds, conf, iou, max_det)
    assert len(ours) == len(ref) == len(preds)
    for o, r in zip(ours, ref):
        assert bits_equal(o, r), (conf, iou, max_det, o.shape, r.shape)
    return ours


@pytest.fixture(params=["pairs", "blocks"])
def greedy(request, monkeypatch):
    """Both ways boxes runs the greedy NMS: listed overlapping pairs (few overlaps) and blocks (many)."""
    monkeypatch.setattr(boxes, "_PAIR_COST", 0 if request.param == "pairs" else 10 ** 9)
    monkeypatch.setattr(boxes, "_BLOCK", 64 if request.param == "blocks" else boxes._BLOCK)  # several blocks
    return request.param


def test_nms_equals_ultralytics_on_random_predictions(greedy):
    rng = np.random.default_rng(11)
    for case in range(15):
        preds = random_preds(rng, int(rng.integers(1, 3)), int(rng.choice([1, 3, 80])),
                             int(rng.choice([50, 500, 2100])), int(rng.integers(1, 30)),
                             quant=[None, 20, 256][case % 3])
        for conf, iou, max_det in [(0.25, 0.7, 300), (0.4, 0.45, 7), (0.05, 0.6, 1000)]:
            assert_same_detections(preds, conf, iou, max_det)


def test_nms_dense_overlaps_equal_ultralytics(greedy):
    """All anchors over conf, big boxes everywhere (what a random-weight model gives)."""
    rng = np.random.default_rng(5)
    for classes in (1, 2, 80):
        preds = random_preds(rng, 1, classes, 2100, 2100, spread=0, noise=0.6, quant=100)
        preds[0, :2], preds[0, 2:4] = rng.random((2, 2100)) * 640, rng.random((2, 2100)) * 300 + 30
        assert len(assert_same_detections(preds, 0.25, 0.7, 300)[0]) == 300


def test_nms_realistic_prediction_keeps_its_objects():
    rng = np.random.default_rng(2)
    preds = random_preds(rng, 1, 80, 8400, 20, spread=3, noise=0.02)
    ours = assert_same_detections(preds, 0.25, 0.7, 300)[0]
    assert 20 <= len(ours) < 300 and np.all(np.diff(ours[:, 4]) <= 0)


def xyxy_preds(xyxy, scores):
    """[1, 4 + C, N] predictions of these xyxy boxes (exact in float32 for these values) and [C, N] scores."""
    xyxy = np.asarray(xyxy, np.float32)
    xywh = np.concatenate(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
    return np.concatenate((xywh.T, np.asarray(scores, np.float32)))[None]


def test_nms_iou_threshold_compared_as_torchvision_does(greedy):
    # IoU 60/100 in float32 is 0.6000000238 > 0.6: torchvision compares it with the double 0.6 and suppresses;
    # 0.65 rounds the other way (0.6499999762): kept at iou=0.65
    preds = xyxy_preds([[0, 0, 10, 10], [0, 0, 10, 6], [20, 20, 30, 30], [20, 20, 30, 26.5]], [[0.9, 0.8, 0.9, 0.8]])
    assert len(assert_same_detections(preds, 0.25, 0.6, 300)[0]) == 2
    assert len(assert_same_detections(preds, 0.25, 0.65, 300)[0]) == 4
    assert len(assert_same_detections(preds, 0.25, 0.45, 300)[0]) == 2


def test_nms_conf_is_strict_in_float32():
    conf = 0.3
    scores = [[np.float32(conf), np.nextafter(np.float32(conf), np.float32(1)), 0.9]]
    preds = xyxy_preds([[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210]], scores)
    ours = assert_same_detections(preds, conf, 0.7, 300)[0]
    assert ours[:, 4].tolist() == [np.float32(0.9), scores[0][1]]  # a score equal to conf is out


def test_nms_ties_keep_anchor_and_class_order(greedy):
    # equal scores: the earlier anchor comes first and suppresses the later; equal classes: the lower index
    preds = xyxy_preds([[50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 10.5], [100, 100, 120, 120]],
                       [[0.5, 0.8, 0.8, 0.7], [0.5, 0.1, 0.1, 0.7]])
    ours = assert_same_detections(preds, 0.25, 0.7, 300)[0]
    assert ours.tolist() == [[0, 0, 10, 10, np.float32(0.8), 0], [100, 100, 120, 120, np.float32(0.7), 0],
                             [50, 50, 60, 60, 0.5, 0]]


def test_nms_classes_are_separate_and_max_det_caps():
    preds = xyxy_preds([[0, 0, 10, 10]] * 3 + [[0, 0, 10, 10.2]], [[0.9, 0, 0, 0.8], [0, 0.8, 0, 0], [0, 0, 0.7, 0]])
    assert assert_same_detections(preds, 0.25, 0.7, 300)[0][:, 5].tolist() == [0, 1, 2]
    assert assert_same_detections(preds, 0.25, 0.7, 2)[0][:, 5].tolist() == [0, 1]
    assert assert_same_detections(preds, 0.25, 0.7, 0)[0].shape == (0, 6)
    assert bits_equal(boxes.non_max_suppression([preds], 0.25, 0.7, 2)[0], reference_nms(preds, 0.25, 0.7, 2)[0])


def test_nms_empty_and_odd_boxes(greedy):
    rng = np.random.default_rng(9)
    preds = random_preds(rng, 3, 4, 400, 6, quant=10)
    preds[1, 4:] = np.minimum(preds[1, 4:], 0.2)  # image 1: nothing over conf
    preds[0, 2:4, :40] = 20000  # boxes wider than the class offset (7680): classes then overlap
    preds[0, 0, 40:45], preds[0, 3, 45:48], preds[0, 2, 48:52] = np.nan, np.inf, 0  # NaN, infinite, empty boxes
    preds[0, 4:, 52:60], preds[0, 4, 60] = 0.7, np.nan  # ties across classes; a NaN score
    preds[2] = preds[0]
    ours = assert_same_detections(preds, 0.25, 0.7, 300)
    assert ours[1].shape == (0, 6) and ours[1].dtype == np.float32 and len(ours[0]) > 0
    assert [d.shape for d in boxes.non_max_suppression(np.zeros((2, 6, 0), np.float32), 0.25, 0.7, 300)] == \
        [(0, 6), (0, 6)]


def test_nms_over_max_nms_boxes_cut_as_torch_sorts():
    """Over 30000 candidates, ultralytics keeps the best 30000 with torch's unstable sort: which of equal scores make
    the cut, and their order, follow it."""
    rng = np.random.default_rng(4)
    preds = random_preds(rng, 1, 2, 31000, 40, noise=0.5, quant=1000)
    preds[0, 4:] = np.maximum(preds[0, 4:], 0.3)
    assert_same_detections(preds, 0.25, 0.7, 300)


# McIlroy's adversary against libstdc++'s introsort: the 28 keys it fixed (0..27) drive the partitions to the depth
# limit, then 173 keys it never compared with each other (any values above 27: here 5 values, many equal) go through
# the heapsort, which scrambles the order of equal keys
KILLER = 200 + np.arange(200, dtype=np.float32) * 7 % 5
KILLER[[0, 1, 199]], KILLER[174:199] = (2, 0, 1), np.arange(27, 2, -1)


def test_torch_argsort_order_of_equal_keys(monkeypatch):
    heapsorted = []
    heap_sort = boxes._heap_sort
    monkeypatch.setattr(boxes, "_heap_sort", lambda *a: heapsorted.append(a[4] - a[3]) or heap_sort(*a))
    rng = np.random.default_rng(6)
    cases = [KILLER, np.sort(rng.integers(0, 50, 5000)).astype(np.float32),
             np.sort(rng.integers(0, 50, 5000)).astype(np.float32)[::-1].copy(), rng.random(20).astype(np.float32)]
    cases += [(rng.integers(0, levels, n) / levels).astype(np.float32)
              for n, levels in [(17, 2), (100, 3), (1000, 10), (40000, 5000), (33600, 30000)]]
    for keys in cases:
        assert np.array_equal(boxes._torch_argsort_desc(keys), torch.from_numpy(keys).argsort(descending=True).numpy())
    assert heapsorted == [173]  # the killer went through the heapsort
    assert not np.array_equal(boxes._torch_argsort_desc(KILLER), np.argsort(-KILLER, kind="stable"))


# --- scale_boxes -----------------------------------------------------------------------------------------------------

def test_scale_boxes_equals_ultralytics():
    rng = np.random.default_rng(8)
    for case in range(200):
        image_shape = (*(int(v) for v in rng.integers(1, 3000, 2)), 3)
        if case % 4:  # what letterbox made of that image
            params = LetterBox((int(rng.choice([320, 640, 641, 1280])),) * 2, auto=bool(case % 2), stride=32) \
                .get_params({"img": np.broadcast_to(np.uint8(0), image_shape)})
            letterboxed = (params["new_unpad"][1] + params["top"] + params["bottom"],
                           params["new_unpad"][0] + params["left"] + params["right"])
        else:
            letterboxed = tuple(int(v) for v in rng.integers(32, 1500, 2))
        h, w = letterboxed
        xyxy = ((rng.random((30, 4)) * 1.4 - 0.2) * np.float32([w, h, w, h])).astype(np.float32)  # some outside
        ours = boxes.scale_boxes(letterboxed, xyxy, image_shape)
        assert bits_equal(ours, ops.scale_boxes(letterboxed, torch.from_numpy(xyxy.copy()), image_shape).numpy())


def test_scale_boxes_undoes_the_letterbox_and_clips():
    # 37×101 at 640 is 640×234 with 11 rows of padding on top (test_letterbox_pads_...): gains 640/101 and 234/37
    out = boxes.scale_boxes((256, 640), np.float32([[-50, 0, 700, 300], [10, 20, 30, 40]]), (37, 101, 3))
    gain_x, gain_y = np.float32(640 / 101), np.float32(234 / 37)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.float32([[0, 0, 101, 37], [10 / gain_x, 9 / gain_y, 30 / gain_x, 29 / gain_y]]))


# --- no torch --------------------------------------------------------------------------------------------------------

def test_boxes_never_imports_torch():
    code = ("import sys, ovdet.model.boxes; "
            "print(sorted(m for m in ('torch', 'torchvision', 'ultralytics') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
    tree = ast.parse(Path(boxes.__file__).read_text())  # nor later, inside a function
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "collections", "cv2", "numpy"}, imported
