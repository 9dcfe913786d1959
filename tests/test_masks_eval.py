"""`ovdet eval` with masks: mask mAP (pycocotools' COCOeval "segm") next to box mAP when the dataset has masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv
from supervision.metrics import MeanAveragePrecision, MetricTarget

from ovdet.cli import main
from ovdet.errors import DatasetError
from ovdet.jobs.evaluate import evaluate, load_dataset
from ovdet.jobs.synth import WorldSpec, generate, image_rng, render
from ovdet.masks import rle
from ovdet.masks.base import paste
from ovdet.runs.journal import read_journal
from ovdet.weights.registry import DEMO_FILE

needs_demo = pytest.mark.skipif(not DEMO_FILE.is_file(), reason=f"demo model {DEMO_FILE} is absent")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("w") / "w", train=1, val=8, seed=5,
                    spec=WorldSpec(objects=(2, 5), imgsz=128), progress=False, masks=True)


@pytest.fixture(scope="module")
def boxes_world(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("b") / "w", train=1, val=4, seed=5,
                    spec=WorldSpec(objects=(2, 5), imgsz=128), progress=False)


class Config:
    masks = "oracle"


class MaskOracle:
    """Stands in for an OVDetector with masks: finds the ground truth, its masks moved by `shift` px (and a box
    score per object, so that AP ranks them)."""

    config = Config()

    def __init__(self, dataset, shift: int = 0, masks: bool = True):
        self.dataset, self.shift, self.calls = dataset, shift, 0
        self.config = Config() if masks else None
        self.classes: list[str] = []

    def set_classes(self, classes):
        self.classes = list(classes)

    def detect_batch(self, images, conf=None, iou=None, mask_rle=False):
        assert mask_rle == (self.config is not None)  # RLEs straight away: never dense masks across a dataset
        out = []
        for img in images:
            image = self.dataset.images[self.calls]
            self.calls += 1
            gt = image.targets(img.shape)
            dets = sv.Detections(xyxy=gt.xyxy, class_id=gt.class_id,
                                 confidence=np.linspace(0.9, 0.5, len(gt)).astype(np.float32))
            if self.config is not None:
                truth = image.masks(img.shape)
                if truth is None:  # a dataset without masks: the boxes filled
                    truth = [rle.encode(_filled(box, img.shape)) for box in gt.xyxy]
                moved = [np.roll(rle.decode(m), self.shift, axis=1) for m in truth]
                dets.data["mask_rle"] = np.array([*map(rle.encode, moved), None], object)[:-1]
            out.append(dets)
        return out


def _filled(box, shape) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    x1, y1, x2, y2 = np.round(box).astype(int)
    mask[y1:y2, x1:x2] = True
    return mask


def _sv_mask_map(dataset, shift):
    """supervision's own mask mAP of the same predictions: an independent reference."""
    preds, tgts = [], []
    for image in dataset.images:
        shape = cv2.imread(str(image.path)).shape
        gt = image.targets(shape)
        masks = np.stack([rle.decode(m) for m in image.masks(shape)])
        tgts.append(sv.Detections(xyxy=gt.xyxy, class_id=gt.class_id, mask=masks))
        preds.append(sv.Detections(xyxy=gt.xyxy, class_id=gt.class_id, mask=np.roll(masks, shift, axis=2),
                                   confidence=np.linspace(0.9, 0.5, len(gt)).astype(np.float32)))
    return MeanAveragePrecision(metric_target=MetricTarget.MASKS).update(preds, tgts).compute()


def test_ground_truth_masks_as_predictions_score_one(world):
    ds = load_dataset(world)
    assert ds.has_masks
    spec = WorldSpec(objects=(2, 5), imgsz=128)
    for i, image in enumerate(ds.images):  # the dataset's masks are synth's exact ones (one-piece masks redraw exactly)
        truth = paste(render(image_rng(5, "val", i), spec, masks=True)[3], 128, 128)
        got = np.stack([rle.decode(m) for m in image.masks((128, 128, 3))])
        assert [(a & b).sum() / (a | b).sum() >= (1.0 if cv2.connectedComponents(a.astype(np.uint8))[0] == 2
                                                  else 0.9) for a, b in zip(truth, got)] == [True] * len(truth)
    result = evaluate(MaskOracle(ds), ds, progress=False)
    assert result.map50 == pytest.approx(1.0) and result.mask_map50 == pytest.approx(1.0)
    assert result.mask_map50_95 == pytest.approx(1.0) and not result.masks_note
    assert all(c.mask_ap50 == pytest.approx(1.0) and c.mask_ap50_95 == pytest.approx(1.0) for c in result.classes)
    assert "mask50" in result.table() and "mask50-95" in result.table()


@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_masks_score_lower_as_pycocotools_and_supervision_say(world, shift):
    ds = load_dataset(world)
    result = evaluate(MaskOracle(ds, shift), ds, progress=False)
    assert result.map50 == pytest.approx(1.0)  # the boxes are perfect: only the masks moved
    assert result.mask_map50_95 < 0.99
    ref = _sv_mask_map(ds, shift)
    assert result.mask_map50_95 == pytest.approx(ref.map50_95, abs=1e-3)
    assert result.mask_map50 == pytest.approx(ref.map50, abs=1e-3)
    further = evaluate(MaskOracle(ds, shift + 3), ds, progress=False)
    assert further.mask_map50_95 < result.mask_map50_95


def test_no_mask_map_without_masks_on_either_side(world, boxes_world):
    ds = load_dataset(world)
    plain = evaluate(MaskOracle(ds, masks=False), ds, progress=False)
    assert plain.mask_map50 is None and plain.mask_map50_95 is None and "give --masks" in plain.masks_note
    assert "mask50" not in plain.table() and "masks: the dataset has masks" in plain.table()
    boxes = load_dataset(boxes_world)
    assert not boxes.has_masks
    result = evaluate(MaskOracle(boxes), boxes, progress=False)
    assert result.map50 == pytest.approx(1.0)
    assert result.mask_map50 is None and "has no masks" in result.masks_note
    assert "mask50" not in result.table()
    assert {c.mask_ap50 for c in result.classes} == {None}


def _coco(tmp_path: Path, segmentation) -> Path:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                         "iscrowd": 0, "segmentation": segmentation}]}))
    return tmp_path / "ann.json"


def test_coco_polygons_and_rles_are_ground_truth_masks(tmp_path):
    square = np.zeros((20, 30), bool)
    square[2:12, 2:12] = True
    flat = square.reshape(-1, order="F").astype(int)  # column-major, as COCO's RLE runs
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()  # starts with a background run
    for i, seg in enumerate([rle.encode(square), [[2, 2, 12, 2, 12, 12, 2, 12]], {"size": [20, 30], "counts": counts}]):
        folder = tmp_path / str(i)
        folder.mkdir()
        ds = load_dataset(_coco(folder, seg))
        got = rle.decode(ds.images[0].masks((20, 30, 3))[0])
        assert got.sum() >= 100 and (got & square).sum() / (got | square).sum() >= 0.8, i
        assert evaluate(MaskOracle(ds), ds, progress=False).mask_map50 == pytest.approx(1.0)


@pytest.mark.parametrize("seg, match", [
    ([[1, 2, 3]], "3 or more x, y pairs"),
    ({"size": [20, 30], "counts": [5, 5]}, "add up to"),
    ({"size": [20, 30], "counts": "garbage!"}, "counts"),
    ("mask", "neither polygons nor an RLE"),
])
def test_a_bad_coco_segmentation_is_a_clear_error(tmp_path, seg, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(_coco(tmp_path, seg))


def test_a_coco_rle_of_another_size_or_a_huge_polygon_is_refused_when_scored(tmp_path):
    (tmp_path / "a").mkdir()
    ds = load_dataset(_coco(tmp_path / "a", rle.encode(np.ones((10, 10), bool))))
    with pytest.raises(DatasetError, match=r"size \[10, 10\], not the image's \[20, 30\]"):
        evaluate(MaskOracle(ds), ds, progress=False)
    (tmp_path / "b").mkdir()
    ds = load_dataset(_coco(tmp_path / "b", [[0, 0, 1e12, 0, 1e12, 1e12, -1e12, 5] * 4]))
    with pytest.raises(DatasetError, match="far outside"):
        ds.images[0].masks((20, 30, 3))
    zigzag = [[0.0, 0.0] + [59.0, 39.0, 0.0, 39.0] * 20_000]
    ds = load_dataset(_coco(tmp_path / "b", zigzag))  # in the image, but an outline of ~2.4 million px
    with pytest.raises(DatasetError, match="px long"):
        ds.images[0].masks((20, 30, 3))


@needs_demo
def test_cli_eval_with_masks_prints_and_saves_mask_map(world, boxes_world, tmp_path, capsys):
    args = ["--model", "demo", "--masks", "grabcut", "--backend", "torch", "--device", "cpu", "--imgsz", "128",
            "--quiet"]
    assert main(["eval", str(world), *args, "--json", "--out", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 < out["mask_map50"] <= 1.0 and 0.0 <= out["mask_map50_95"] <= out["mask_map50"]
    assert out["masks_note"] == "" and all("mask_ap50" in c for c in out["classes"])
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["result"]["mask_map50"] == out["mask_map50"] and saved["settings"]["masks"] == "grabcut"
    dets = [d for r in read_journal(tmp_path / "run" / "predictions.jsonl") for d in r["detections"]]
    assert dets and all(rle.rle_problem(d["segmentation"]) == "" for d in dets)  # the report can draw them
    assert main(["eval", str(world), *args]) == 0
    table = capsys.readouterr().out
    assert "mask50" in table.splitlines()[0] and f"{out['mask_map50']:.3f}" in table.splitlines()[1]
    assert main(["eval", str(boxes_world), *args]) == 0
    table = capsys.readouterr().out
    assert "mask50" not in table and "has no masks" in table
