"""Masks after annotate: relabel keeps each kept box's mask in every format (equal to a fresh annotate run's); video
JSONL carries each box's mask as an RLE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pycocotools.coco import COCO

from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.jobs.relabel import relabel_run
from ovdet.masks import rle
from ovdet.runs.journal import read_journal
from ovdet.video.job import process_video
from ovdet.weights.registry import DEMO_FILE

from test_capture import BlobDetector, make_video, moving_square_frames
from test_relabel import _tree

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["red circle", "blue square", "green triangle"]
RUN_CONF = 0.05
NEW_CONF = {"red circle": 0.4, "blue square": 0.3}  # "green triangle" keeps the run's 0.05

needs_demo = pytest.mark.skipif(not DEMO_FILE.is_file(), reason=f"demo model {DEMO_FILE} is absent")


@pytest.fixture(scope="module")
def demo():
    from ovdet import OVDetector

    return OVDetector("demo", device="cpu", imgsz=320)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """samples/shapes plus a blank image (no boxes: its journal line holds no masks, its outputs still do)."""
    src = tmp_path_factory.mktemp("src")
    for image in (REPO / "samples" / "shapes").iterdir():
        shutil.copy(image, src / image.name)
    cv2.imwrite(str(src / "blank.png"), np.full((90, 120, 3), 255, np.uint8))
    return src


@pytest.fixture(scope="module")
def masked_run(demo, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("masked") / "run"
    annotate_folder(source, SHAPES, out, detector=demo, conf=RUN_CONF, masks="grabcut", formats="coco,yolo,voc,jsonl",
                    quiet=True)
    assert not next(r for r in read_journal(out / "predictions.jsonl") if r["key"] == "blank")["detections"]
    return out


def _by_box(root: Path) -> dict[tuple, dict]:
    """Journal detections keyed by (image, bbox)."""
    return {(r["image"], tuple(d["bbox"])): d for r in read_journal(root / "predictions.jsonl")
            for d in r["detections"]}


@needs_demo
def test_relabel_of_a_masks_run_equals_a_fresh_masks_run_in_every_format(demo, source, masked_run, tmp_path):
    summary = relabel_run(masked_run, tmp_path / "relabelled", conf=NEW_CONF, quiet=True)
    assert summary.kept > 0 and summary.dropped > 0  # the thresholds really cut
    class_file = tmp_path / "classes.yaml"
    class_file.write_text(yaml.safe_dump({"classes": [
        {"name": n, "conf": NEW_CONF[n]} if n in NEW_CONF else n for n in SHAPES]}))
    annotate_folder(source, str(class_file), tmp_path / "fresh", detector=demo, conf=RUN_CONF,
                    masks="grabcut", formats="coco,yolo,voc,jsonl", quiet=True)
    relabelled, fresh = _tree(tmp_path / "relabelled"), _tree(tmp_path / "fresh")
    assert "voc/SegmentationObject/blank.png" in fresh
    assert sorted(relabelled) == sorted(fresh)
    for name in fresh:
        assert relabelled[name] == fresh[name], name
    anns = fresh["coco/annotations.json"]["annotations"]
    assert anns and all("counts" in a["segmentation"] for a in anns)


@needs_demo
def test_relabel_keeps_the_runs_masks_for_kept_boxes(masked_run, tmp_path):
    out = tmp_path / "out"
    summary = relabel_run(masked_run, out, conf="red circle=0.3", rename="blue square=square", quiet=True)
    assert summary.kept > 0 and summary.dropped > 0
    before, after = _by_box(masked_run), _by_box(out)
    assert after and set(after) < set(before)
    for key, d in after.items():  # JSONL: each kept box keeps its RLE
        assert d["segmentation"] == before[key]["segmentation"]
    api = COCO(str(out / "coco" / "annotations.json"))
    images = {im["id"]: im["file_name"] for im in api.dataset["images"]}
    anns = api.loadAnns(api.getAnnIds())
    assert len(anns) == len(after)
    for ann in anns:  # COCO: the same masks, found by their box
        x, y, w, h = ann["bbox"]
        match = [d for (image, box), d in after.items() if Path(image).name == Path(images[ann["image_id"]]).name
                 and np.allclose(box, [x, y, x + w, y + h], atol=1e-2)]
        assert len(match) == 1
        assert (api.annToMask(ann).astype(bool) == rle.decode(match[0]["segmentation"])).all()
    for r in read_journal(out / "predictions.jsonl"):  # YOLO: the run's own polygon lines, class ids renumbered
        old = {tuple(d["bbox"]): d for d in (x for x in read_journal(masked_run / "predictions.jsonl")
                                             if x["key"] == r["key"]).__next__()["detections"]}
        label = (out / "yolo" / "labels" / f"{r['key']}.txt").read_text().splitlines()
        orig = (masked_run / "yolo" / "labels" / f"{r['key']}.txt").read_text().splitlines()
        assert len(label) == len(r["detections"])
        for line, d in zip(label, r["detections"]):
            i = list(old).index(tuple(d["bbox"]))
            assert len(line.split()) > 5  # a polygon, not a box
            assert line.split()[1:] == orig[i].split()[1:] and int(line.split()[0]) == d["class_id"]
    names = [c["name"] for c in json.loads((out / "coco" / "annotations.json").read_text())["categories"]]
    assert names == ["red circle", "square", "green triangle"]


# ----------------------------------------------------------------------------- video JSONL


class MaskedBlobDetector(BlobDetector):
    """BlobDetector with each blob's own pixels as its mask (dense, as OVDetector.detect_batch gives them)."""

    def detect_batch(self, images, conf=None, **kw):
        out = super().detect_batch(images, conf=conf, **kw)
        for image, dets in zip(images, out):
            bright = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) > 200
            masks = np.zeros((len(dets), *bright.shape), bool)
            for m, (x1, y1, x2, y2) in zip(masks, dets.xyxy.astype(int)):
                m[y1:y2, x1:x2] = bright[y1:y2, x1:x2]
            dets.mask = masks
        return out


@pytest.mark.parametrize("track", [False, True])
def test_video_jsonl_carries_each_boxs_mask_as_an_rle(tmp_path, track):
    src = make_video(tmp_path / "in.mp4", n=10, size=(160, 120), fps=12)
    process_video(MaskedBlobDetector(), src, None, tmp_path / "d.jsonl", track=track, batch=3, progress=False)
    frames = [np.asarray(f) for f in moving_square_frames(10, (160, 120))]
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    dets = [(r, d) for r in records for d in r["detections"]]
    assert len(records) == 10 and len(dets) >= 8
    for record, d in dets:
        mask = rle.decode(d["segmentation"])
        assert d["segmentation"]["size"] == [120, 160] and mask.sum() > 20
        x1, y1, x2, y2 = np.round(d["xyxy"]).astype(int)
        assert mask[y1:y2, x1:x2].sum() == mask.sum()  # inside its box
        decoded = cv2.cvtColor(frames[record["frame"]], cv2.COLOR_BGR2GRAY) > 200  # what was drawn (before mp4)
        assert (mask & decoded).sum() / (mask | decoded).sum() > 0.8
        assert (d["track_id"] is not None) == track
    process_video(BlobDetector(), src, None, tmp_path / "plain.jsonl", progress=False)  # no masks: no key
    assert all("segmentation" not in d for line in (tmp_path / "plain.jsonl").read_text().splitlines()
               for d in json.loads(line)["detections"])


@needs_demo
def test_cli_video_with_masks_writes_rles(tmp_path):
    image = cv2.imread(str(REPO / "samples" / "shapes" / "shape_1.jpg"))
    writer = cv2.VideoWriter(str(tmp_path / "in.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, image.shape[1::-1])
    for _ in range(4):
        writer.write(image)
    writer.release()
    assert main(["video", str(tmp_path / "in.mp4"), "--model", "demo", "--classes", ",".join(SHAPES), "--masks",
                 "grabcut", "--jsonl", str(tmp_path / "d.jsonl"), "--conf", "0.1", "--device", "cpu", "--backend",
                 "torch", "--quiet"]) == 0
    dets = [d for line in (tmp_path / "d.jsonl").read_text().splitlines() for d in json.loads(line)["detections"]]
    assert dets
    for d in dets:
        mask = rle.decode(d["segmentation"])
        x1, y1, x2, y2 = d["xyxy"]
        ys, xs = np.nonzero(mask)  # GrabCut stays inside its box
        assert len(xs) and xs.min() >= np.floor(x1) - 1 and xs.max() < np.ceil(x2) + 1 and ys.min() >= np.floor(y1) - 1 \
            and ys.max() < np.ceil(y2) + 1
