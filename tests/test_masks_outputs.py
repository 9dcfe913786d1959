"""Masks in every output: synth ground truth through each writer and back (pycocotools, ultralytics' segment label
checks, the VOC PNG, the journal), and `ovdet annotate --masks grabcut` end to end on samples/shapes.

Tolerance: RLEs (COCO, JSONL) and the VOC PNG are exact; a YOLO polygon (vertices on pixel edges) redraws its mask
exactly by the pixel-centre rule (ovdet.masks.rle.polygon_mask), holes filled, after the 6-decimal rounding, and the
box ultralytics derives from it (the polygon's extent) is the mask's box within that rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from ultralytics.data.utils import verify_image_label

from ovdet.cli import main
from ovdet.datasets.formats import open_dataset_writers, rebuild_from_journal
from ovdet.errors import DatasetError, ResumeMismatchError
from ovdet.jobs.annotate import annotate_folder
from ovdet.jobs.synth import WorldSpec, generate, image_rng, render
from ovdet.masks import rle
from ovdet.masks.base import paste
from ovdet.runs.journal import ImageRecord, Journal, checked_image_record, read_journal

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["red circle", "blue square", "green triangle"]


def _one_piece(mask: np.ndarray) -> bool:
    return cv2.connectedComponents(mask.astype(np.uint8))[0] == 2


def _holes_filled(mask: np.ndarray) -> np.ndarray:
    frame = np.ascontiguousarray(np.pad(mask, 1), np.uint8)
    cv2.floodFill(frame, None, (0, 0), 2, flags=4)
    return frame[1:-1, 1:-1] != 2


def _label_masks(label: Path, height: int, width: int) -> list[np.ndarray]:
    """A YOLO segment label file drawn back by the pixel-centre rule."""
    out = []
    for line in label.read_text().splitlines():
        xy = np.array(line.split()[1:], np.float64).reshape(-1, 2) * (width, height)
        out.append(rle.polygon_mask(xy, height, width))
    return out


def _ultralytics_boxes(image: Path, label: Path, classes: int) -> tuple[np.ndarray, list]:
    """The boxes (xyxy, pixels) ultralytics' label check derives from a segment label file, and its segments."""
    checked = verify_image_label((str(image), str(label), "", False, classes, 0, 0, False))
    assert checked[-2] == 0, checked[-1]  # none corrupt
    height, width = checked[2]
    x, y, w, h = (checked[1][:, 1:].astype(np.float64) * (width, height, width, height)).T
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1), checked[3]


def _assert_boxes_are_the_masks(boxes: np.ndarray, masks, size: int) -> None:
    """Each derived box is its mask's box, within the 6-decimal rounding of the label (and ultralytics' float32)."""
    assert len(boxes) == len(masks)
    for box, mask in zip(boxes, masks):
        x, y, w, h = rle.to_bbox(rle.encode(mask))
        assert np.abs(box - (x, y, x + w, y + h)).max() <= 1e-5 * size, (box, (x, y, x + w, y + h))


def test_synth_masks_are_exact_and_its_segment_labels_redraw_them(tmp_path):
    spec = WorldSpec(objects=(4, 8), imgsz=150)  # 150: pixel/150 is no short decimal, so rounding is exercised
    generate(tmp_path, train=6, val=0, seed=4, spec=spec, progress=False, masks=True)
    pieces = 0
    for i in range(6):
        img, boxes, class_ids, parts = render(image_rng(4, "train", i), spec, masks=True)
        assert (cv2.imread(str(tmp_path / "images" / "train" / f"{i:06d}.png")) == img).all()
        truth = paste(parts, 150, 150)
        assert (truth.sum(axis=0) <= 1).all()  # instances do not overlap
        for m, (x1, y1, x2, y2) in zip(truth, boxes.astype(int)):
            assert m.any() and not m.copy()[y1:y2, x1:x2].sum() - m.sum()  # inside its box
        label = tmp_path / "labels" / "train" / f"{i:06d}.txt"
        drawn = _label_masks(label, 150, 150)
        assert [int(line.split()[0]) for line in label.read_text().splitlines()] == class_ids.tolist()
        assert len(drawn) == len(truth)
        for want, got in zip(truth, drawn):
            assert (got == _holes_filled(want)).all()
            pieces += _one_piece(want)
        boxes_seen, segments = _ultralytics_boxes(tmp_path / "images" / "train" / f"{i:06d}.png", label,
                                                  len(spec.names))
        assert len(segments) == len(class_ids)
        _assert_boxes_are_the_masks(boxes_seen, truth, 150)
    assert pieces >= 20
    # a disc is a disc: not its box
    img, boxes, class_ids, parts = render(image_rng(4, "train", 0), spec, masks=True)
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    circles = [p.area / a for p, a, c in zip(parts, box_area, class_ids) if spec.names[c].endswith("circle")]
    assert all(0.6 < r < 0.9 for r in circles)


def _written(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[ImageRecord]]:
    """Three synth images with their exact masks written through the COCO, YOLO and VOC writers and the journal."""
    spec = WorldSpec(objects=(3, 6), imgsz=150)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    writers, coco = open_dataset_writers(out, spec.names, ["coco", "yolo", "voc"])
    journal = Journal(out / "predictions.jsonl")
    truths, records = [], []
    for i in range(3):
        img, boxes, class_ids, parts = render(image_rng(9, "val", i), spec, masks=True)
        cv2.imwrite(str(src / f"{i}.png"), img)
        truth = paste(parts, *img.shape[:2])
        rec = ImageRecord(f"{i}.png", str(src / f"{i}.png"), str(i), 150, 150, boxes.astype(np.float64), class_ids,
                          np.linspace(0.9, 0.5, len(boxes)), [rle.encode_part(p, 150, 150) for p in parts])
        for writer in writers:
            writer.write(rec)
        journal.append(rec.to_json(spec.names))
        truths.append(truth)
        records.append(rec)
    journal.close()
    rebuild_from_journal(writers, coco, out / "predictions.jsonl")
    return out, truths, records


def test_every_writer_gives_the_synth_masks_back(tmp_path):
    out, truths, records = _written(tmp_path)
    api = COCO(str(out / "coco" / "annotations.json"))
    for image_id, truth in enumerate(truths, 1):
        anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(truth)
        for ann, want in zip(anns, truth):
            assert (api.annToMask(ann).astype(bool) == want).all()  # COCO: exact
            assert ann["area"] == want.sum()
    for i, truth in enumerate(truths):
        drawn = _label_masks(out / "yolo" / "labels" / f"{i}.txt", 150, 150)
        assert len(drawn) == len(truth)
        for want, got in zip(truth, drawn):
            assert (got == _holes_filled(want)).all()  # YOLO: polygons, holes filled
        png = Image.open(out / "voc" / "SegmentationObject" / f"{i}.png")
        assert png.mode == "P"
        index = np.asarray(png)
        for k, want in enumerate(truth, 1):
            assert ((index == k) == want).all()  # VOC: exact (synth instances do not overlap)
        assert "<segmented>1</segmented>" in (out / "voc" / "Annotations" / f"{i}.xml").read_text()
    for line, truth in zip(read_journal(out / "predictions.jsonl"), truths):
        rec = ImageRecord.from_json(line)
        assert (np.stack([rle.decode(m) for m in rec.masks]) == truth).all()  # JSONL: exact
        assert (rec.detections(["x"] * 9).mask == truth).all()


def test_overlapping_masks_in_the_voc_png_show_the_higher_score(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((20, 20, 3), np.uint8))
    low, high = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    low[2:12, 2:12], high[8:18, 8:18] = True, True
    rec = ImageRecord("a.png", str(src / "a.png"), "a", 20, 20, np.array([[2, 2, 12, 12], [8, 8, 18, 18]], float),
                      np.array([0, 0]), np.array([0.3, 0.9]), [rle.encode(low), rle.encode(high)])
    [voc], _ = open_dataset_writers(out, ["thing"], ["voc"])
    voc.write(rec)
    index = np.asarray(Image.open(out / "voc" / "SegmentationObject" / "a.png"))
    assert index[10, 10] == 2 and index[3, 3] == 1 and index[17, 17] == 2 and index[0, 0] == 0


def test_a_journal_with_a_damaged_segmentation_is_refused():
    good = {"image": "a.png", "path": "/x/a.png", "key": "a", "width": 4, "height": 3,
            "detections": [{"class_id": 0, "score": 0.5, "bbox": [0, 0, 2, 2],
                            "segmentation": rle.encode(np.ones((3, 4), bool))}]}
    assert checked_image_record(good, 1) is good
    for bad in ({"size": [3, 4], "counts": "5"}, {"size": [4, 3], "counts": rle.encode(np.ones((4, 3), bool))["counts"]},
                {"size": [3, 4], "counts": [12]}, "RLE"):
        record = json.loads(json.dumps(good))
        record["detections"][0]["segmentation"] = bad
        with pytest.raises(DatasetError, match="segmentation"):
            checked_image_record(record, 1)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    out = tmp_path_factory.mktemp("masks") / "run"
    code = main(["annotate", str(REPO / "samples" / "shapes"), "--model", "demo", "--classes", ",".join(SHAPES),
                 "--masks", "grabcut", "--format", "coco,yolo,jsonl", "--out", str(out), "--conf", "0.1",
                 "--backend", "torch", "--device", "cpu", "--quiet"])
    assert code == 0
    return out


def test_annotate_with_grabcut_writes_masks_pycocotools_and_ultralytics_accept(annotated):
    records = list(read_journal(annotated / "predictions.jsonl"))
    dets = [d for r in records for d in r["detections"]]
    assert len(records) == 4 and len(dets) >= 4
    assert json.loads((annotated / "run.json").read_text())["settings"]["masks"] == "grabcut"
    api = COCO(str(annotated / "coco" / "annotations.json"))
    anns = api.loadAnns(api.getAnnIds())
    assert len(anns) == len(dets)
    for ann, d in zip(anns, dets):
        mask = api.annToMask(ann).astype(bool)
        assert (mask == rle.decode(d["segmentation"])).all() and ann["area"] == mask.sum() > 0
        x1, y1, x2, y2 = d["bbox"]
        ys, xs = np.nonzero(mask)  # GrabCut never leaves its box
        assert xs.min() >= np.floor(x1) and xs.max() < np.ceil(x2) and ys.min() >= np.floor(y1) \
            and ys.max() < np.ceil(y2)
        assert coco_mask.area(api.annToRLE(ann)) == ann["area"]
    for r in records:
        label = annotated / "yolo" / "labels" / f"{r['key']}.txt"
        image = annotated / "yolo" / "images" / f"{r['key']}.jpg"
        wants = [rle.decode(d["segmentation"]) for d in r["detections"]]
        boxes_seen, segments = _ultralytics_boxes(image, label, 3)
        assert len(segments) == len(wants)
        _assert_boxes_are_the_masks(boxes_seen, wants, max(r["width"], r["height"]))  # the object's box, exactly
        drawn = _label_masks(label, r["height"], r["width"])
        assert len(drawn) == len(wants)
        for want, got in zip(wants, drawn):
            assert (got == _holes_filled(want)).all()


def test_a_resume_with_other_masks_is_refused(annotated):
    with pytest.raises(ResumeMismatchError, match="masks: grabcut → none"):
        annotate_folder(REPO / "samples" / "shapes", SHAPES, annotated, formats="coco,yolo,jsonl", model="demo",
                        conf=0.1, backend="torch", device="cpu", quiet=True)
