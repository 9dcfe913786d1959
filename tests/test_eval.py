"""ovdet.jobs.evaluate: the metric equals pycocotools, datasets load, prompts map to dataset classes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import supervision as sv
from pycocotools.coco import COCO  # the test extra installs it: imported, never skipped
from pycocotools.cocoeval import COCOeval

from ovdet.errors import DatasetError
from ovdet.jobs.evaluate import compute_map, evaluate, load_dataset, parse_mapping

NAMES = ["red circle", "blue square", "green triangle"]
# Hand-made ground truth: per image, rows of (class, x1, y1, x2, y2) in pixels of a 200x160 image.
TRUTH = [
    [(0, 10, 10, 50, 50), (1, 100, 20, 160, 80), (2, 60, 100, 110, 150)],
    [(0, 20, 30, 90, 100), (0, 120, 10, 180, 70)],
    [(1, 5, 5, 45, 45), (2, 130, 90, 190, 150), (1, 70, 60, 120, 110)],
    [],  # an image without objects
]
H, W = 160, 200


def targets() -> list[sv.Detections]:
    return [sv.Detections(xyxy=np.array([r[1:] for r in rows], np.float32).reshape(-1, 4),
                          class_id=np.array([r[0] for r in rows], int)) for rows in TRUTH]


def pycoco_scores(preds: list[sv.Detections], tgts: list[sv.Detections]) -> tuple[float, float, dict[int, tuple]]:
    """(mAP50-95, mAP50, {class: (AP50, AP50-95)}) computed by pycocotools itself."""
    images = [{"id": i + 1, "width": W, "height": H} for i in range(len(tgts))]
    anns, dets = [], []
    for i, (p, t) in enumerate(zip(preds, tgts)):
        for box, c in zip(t.xyxy.tolist(), t.class_id.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [box[0], box[1], w, h],
                         "area": w * h, "iscrowd": 0})
        for box, c, s in zip(p.xyxy.tolist(), p.class_id.tolist(), p.confidence.tolist()):
            dets.append({"image_id": i + 1, "category_id": c + 1, "score": s,
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": i + 1} for i in range(len(NAMES))]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets) if dets else COCO(), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area=all, maxDets=100
    per_class = {}
    for k in range(len(NAMES)):
        p = prec[:, :, k]
        if (p > -1).any():
            per_class[k] = (float(p[0][p[0] > -1].mean()), float(p[p > -1].mean()))
    return float(ev.stats[0]), float(ev.stats[1]), per_class


def _with_scores(tgts: list[sv.Detections], shift: float = 0.0, seed: int = 0) -> list[sv.Detections]:
    rng = np.random.default_rng(seed)
    return [sv.Detections(xyxy=t.xyxy + np.float32(shift), confidence=rng.uniform(0.3, 0.95, len(t)).astype(np.float32),
                          class_id=t.class_id.copy()) for t in tgts]


def test_perfect_predictions_score_one():
    result = compute_map(_with_scores(targets()), targets(), NAMES)
    assert result.map50 == pytest.approx(1.0)
    assert result.map50_95 == pytest.approx(1.0)
    assert [c.name for c in result.classes] == NAMES
    assert [c.instances for c in result.classes] == [3, 3, 2]
    assert result.images == 4 and result.instances == 8


@pytest.mark.parametrize("shift", [2.0, 5.0, 9.0, 30.0])
def test_shifted_boxes_match_pycocotools(shift):
    preds, tgts = _with_scores(targets(), shift=shift), targets()
    ours = compute_map(preds, tgts, NAMES)
    ref50_95, ref50, ref_classes = pycoco_scores(preds, tgts)
    assert ours.map50_95 == pytest.approx(ref50_95, abs=1e-6)
    assert ours.map50 == pytest.approx(ref50, abs=1e-6)
    assert ours.map50_95 < 1.0  # shifted boxes lose the strict IoU thresholds
    for score in ours.classes:
        k = NAMES.index(score.name)
        assert (score.ap50, score.ap50_95) == pytest.approx(ref_classes[k], abs=1e-6)


def test_mixed_errors_match_pycocotools():
    """False positives, a wrong class, a missed object and duplicates: still exactly pycocotools."""
    tgts = targets()
    preds = _with_scores(tgts, shift=2.0, seed=1)
    extra = sv.Detections(xyxy=np.array([[150, 100, 190, 140], [12, 11, 51, 49]], np.float32),
                          confidence=np.array([0.99, 0.4], np.float32), class_id=np.array([0, 0]))
    preds[0] = sv.Detections.merge([preds[0], extra])  # a confident false positive and a duplicate
    preds[1] = preds[1][np.array([True, False])]  # one red circle missed
    preds[2].class_id[0] = 2  # a blue square called a green triangle
    preds[3] = sv.Detections(xyxy=np.array([[1, 1, 30, 30]], np.float32), confidence=np.array([0.8], np.float32),
                             class_id=np.array([1]))  # false positive on the empty image
    ours = compute_map(preds, tgts, NAMES)
    ref50_95, ref50, ref_classes = pycoco_scores(preds, tgts)
    assert ours.map50 == pytest.approx(ref50, abs=1e-6)
    assert ours.map50_95 == pytest.approx(ref50_95, abs=1e-6)
    assert ours.map50 < 1.0
    for score in ours.classes:
        assert (score.ap50, score.ap50_95) == pytest.approx(ref_classes[NAMES.index(score.name)], abs=1e-6)


def test_no_objects_is_an_error():
    empty = [sv.Detections(xyxy=np.zeros((0, 4), np.float32), class_id=np.zeros(0, int))]
    with pytest.raises(DatasetError, match="no labelled objects"):
        compute_map(empty, empty, NAMES)


# ---------------------------------------------------------------- datasets on disk


def write_yolo(root, names=NAMES, truth=TRUTH):
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for i, rows in enumerate(truth):
        cv2.imwrite(str(root / "images" / "val" / f"{i}.png"), np.full((H, W, 3), 127, np.uint8))
        lines = [f"{c} {(x1 + x2) / 2 / W} {(y1 + y2) / 2 / H} {(x2 - x1) / W} {(y2 - y1) / H}"
                 for c, x1, y1, x2, y2 in rows]
        if rows:  # the empty image has no label file at all, as YOLO allows
            (root / "labels" / "val" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        "train: images/val\nval: images/val\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    return root / "data.yaml"


def write_coco(root):
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, rows in enumerate(TRUTH):
        cv2.imwrite(str(root / f"{i}.png"), np.full((H, W, 3), 127, np.uint8))
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": W, "height": H})
        for c, x1, y1, x2, y2 in rows:
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": 5 + c,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": 5 + i, "name": n} for i, n in enumerate(NAMES)]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "annotations.json"


@pytest.mark.parametrize("kind", ["yolo", "coco"])
def test_datasets_load_pixel_boxes(tmp_path, kind):
    path = write_yolo(tmp_path) if kind == "yolo" else write_coco(tmp_path / "coco")
    for source in (path, path.parent):  # the file or the folder that holds it
        ds = load_dataset(source)
        assert ds.names == NAMES
        assert len(ds.images) == len(TRUTH)
        for image, want in zip(ds.images, targets()):
            got = image.targets((H, W, 3))
            np.testing.assert_allclose(got.xyxy, want.xyxy, atol=1e-3)
            np.testing.assert_array_equal(got.class_id, want.class_id)


def test_yolo_polygon_labels_become_boxes(tmp_path):
    data = write_yolo(tmp_path, truth=[[]])
    (tmp_path / "labels" / "val" / "0.txt").write_text("1 0.1 0.2 0.5 0.2 0.3 0.6\n")
    got = load_dataset(data).images[0].targets((100, 100, 3))
    np.testing.assert_allclose(got.xyxy, [[10, 20, 50, 60]], atol=1e-4)


@pytest.mark.parametrize("content, match", [("0 0.5 0.5 0.1\n", "needs 'class cx cy w h'"),
                                            ("7 0.5 0.5 0.1 0.1\n", "class id 7"),
                                            ("a b c d e\n", "not a YOLO label row")])
def test_bad_yolo_labels_are_clear_errors(tmp_path, content, match):
    data = write_yolo(tmp_path, truth=[[]])
    (tmp_path / "labels" / "val" / "0.txt").write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_dataset(data)


def test_missing_dataset_and_split(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.yaml")
    data = write_yolo(tmp_path)
    with pytest.raises(DatasetError, match="no 'test' split"):
        load_dataset(data, split="test")


# ---------------------------------------------------------------- evaluate(): prompts and mapping


class OracleDetector:
    """Stands in for OVDetector: finds exactly the ground truth of the classes its prompts name."""

    def __init__(self, dataset, prompt_to_name, jitter=0.0):
        self.dataset, self.prompt_to_name, self.jitter = dataset, prompt_to_name, jitter
        self.classes: list[str] = []
        self.calls = 0

    def set_classes(self, classes):
        self.classes = list(classes)

    def detect_batch(self, images, conf=None, iou=None):
        out = []
        for img in images:
            image = self.dataset.images[self.calls]
            self.calls += 1
            gt = image.targets(img.shape)
            rows = [(box, self.classes.index(p)) for box, c in zip(gt.xyxy, gt.class_id)
                    for p in self.classes if self.prompt_to_name.get(p) == self.dataset.names[c]]
            out.append(sv.Detections(xyxy=np.array([r[0] + self.jitter for r in rows], np.float32).reshape(-1, 4),
                                     confidence=np.full(len(rows), 0.9, np.float32),
                                     class_id=np.array([r[1] for r in rows], int)))
        return out


def test_evaluate_defaults_to_dataset_names(tmp_path):
    ds = load_dataset(write_yolo(tmp_path))
    det = OracleDetector(ds, {n: n for n in NAMES})
    result = evaluate(det, ds, batch=3, progress=False)
    assert det.classes == NAMES
    assert result.map50 == pytest.approx(1.0) and result.map50_95 == pytest.approx(1.0)
    assert {c.name: c.instances for c in result.classes} == {"red circle": 3, "blue square": 3, "green triangle": 2}


def test_evaluate_with_map_and_class_subset(tmp_path):
    ds = load_dataset(write_yolo(tmp_path))
    mapping = parse_mapping("red circle=a red disc, blue square = a blue box", ds.names)
    assert mapping == {"red circle": "a red disc", "blue square": "a blue box"}
    det = OracleDetector(ds, {"a red disc": "red circle", "a blue box": "blue square", "forklift": None})
    result = evaluate(det, ds, classes=["a red disc", "forklift"], mapping=mapping, progress=False)
    assert det.classes == ["a red disc", "forklift"]
    assert [(c.name, c.dataset_classes, c.instances) for c in result.classes] == [("a red disc", ["red circle"], 3)]
    assert result.map50 == pytest.approx(1.0)


def test_evaluate_detections_of_the_wrong_class_cost_precision(tmp_path):
    """A detector that calls every blue square a red circle: red circle AP drops, exactly as pycocotools says."""
    ds = load_dataset(write_yolo(tmp_path))
    det = OracleDetector(ds, {"red circle": "red circle"})
    wrong = OracleDetector(ds, {"red circle": "blue square"})

    class Both:
        def set_classes(self, classes):
            det.set_classes(classes)
            wrong.set_classes(classes)
            self.classes = det.classes

        def detect_batch(self, images, conf=None, iou=None):
            a, b = det.detect_batch(images), wrong.detect_batch(images)
            for x in b:
                x.confidence[:] = 0.95  # the wrong ones rank first
            return [sv.Detections.merge([x, y]) for x, y in zip(a, b)]

    result = evaluate(Both(), ds, classes=["red circle"], progress=False)
    assert len(result.classes) == 1
    ref = pycoco_scores([sv.Detections.merge([x, y]) for x, y in zip(
        _oracle(ds, "red circle", 0.9), _oracle(ds, "blue square", 0.95))], _only(targets(), 0))[1]
    assert result.map50 == pytest.approx(ref, abs=1e-6)
    assert result.map50 < 0.9


def _oracle(ds, name, score):
    out = []
    for image in ds.images:
        t = image.targets((H, W, 3))
        keep = t.class_id == ds.names.index(name)
        out.append(sv.Detections(xyxy=t.xyxy[keep], confidence=np.full(keep.sum(), score, np.float32),
                                 class_id=np.zeros(keep.sum(), int)))
    return out


def _only(tgts, class_id):
    return [t[t.class_id == class_id] for t in tgts]


def test_evaluate_errors(tmp_path):
    ds = load_dataset(write_yolo(tmp_path))
    with pytest.raises(DatasetError, match="names a dataset class"):
        evaluate(OracleDetector(ds, {}), ds, classes=["forklift"], progress=False)
    with pytest.raises(DatasetError, match="not a dataset class"):
        parse_mapping("truck=a truck", ds.names)
    with pytest.raises(DatasetError, match="dataset_name=prompt"):
        parse_mapping("red circle", ds.names)


# ---------------------------------------------------------------- the command


@pytest.fixture
def random_checkpoint(tmp_path):
    """A random yolov8n-worldv2 checkpoint carrying a small random text tower (so no CLIP file is needed)."""
    import torch
    from ultralytics.nn.tasks import WorldModel

    from ovdet.text.tower import TextEncoder
    from ovdet.weights.checkpoint import TEXT_ENCODER_KEY, _quiet_ultralytics

    torch.manual_seed(0)
    with _quiet_ultralytics():
        model = WorldModel("yolov8n-worldv2.yaml", verbose=False)
    path = tmp_path / "random-world.pt"
    torch.save({"model": model.half(), "train_args": {}, TEXT_ENCODER_KEY: TextEncoder.random(seed=0).to_state()},
               path)
    return path


def test_cli_eval_table_and_json(tmp_path, random_checkpoint, capsys, monkeypatch):
    from ovdet.cli import main

    monkeypatch.setenv("OVDET_PROGRESS_SECONDS", "0")
    data = write_yolo(tmp_path / "ds")
    common = ["--model", str(random_checkpoint), "--device", "cpu", "--imgsz", "160"]
    assert main(["eval", str(data), *common, "--map", "blue square=a blue box"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "eval: 4/4 (100%) in " in captured.err
    table = captured.out.splitlines()
    assert table[0].split() == ["class", "images", "instances", "mAP50", "mAP50-95"]
    assert table[1].split()[:3] == ["all", "4", "8"]
    assert [line.split("  ")[0].strip() for line in table[2:5]] == ["red circle", "a blue box", "green triangle"]
    assert table[-1].startswith("mAP50 ") and "random-world@" in table[-1]

    assert main(["eval", str(data), *common, "--classes", "red circle,forklift", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = json.loads(captured.out)
    assert out["split"] == "val" and out["images"] == 4 and out["instances"] == 3
    assert [c["name"] for c in out["classes"]] == ["red circle"]
    assert 0.0 <= out["map50_95"] <= out["map50"] <= 1.0

    assert main(["eval", str(data), *common, "--classes", "forklift"]) == 2
    assert "names a dataset class" in capsys.readouterr().err
