"""masks= on the API: OVDetector(..., masks=...) and detect(..., masks=...) give sv.Detections.mask, one per box."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from ovdet.config import DetectorConfig
from ovdet.detector import OVDetector
from ovdet.errors import UnknownModelError
from ovdet.jobs.synth import WorldSpec, image_rng, render
from ovdet.masks import Segmenter, create_segmenter
from ovdet.masks import rle
from ovdet.media.draw import draw

CLASSES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def det():
    d = OVDetector("demo", device="cpu", backend="torch", masks="grabcut", conf=0.05)
    d.set_classes(CLASSES)
    return d


@pytest.fixture(scope="module")
def image():
    return render(image_rng(7, "val", 0), WorldSpec())[0]


def test_masks_come_with_every_box_in_image_pixels(det, image):
    dets = det.detect(image)
    assert len(dets) > 0 and dets.mask is not None
    assert dets.mask.shape == (len(dets), *image.shape[:2]) and dets.mask.dtype == bool
    expected = create_segmenter("grabcut").segment(image, dets.xyxy)
    assert (dets.mask == expected).all()  # the segmenter's masks for the detector's boxes, nothing else
    for mask, (x1, y1, x2, y2) in zip(dets.mask, dets.xyxy):
        assert mask.any()
        ys, xs = np.nonzero(mask)
        assert xs.min() >= np.floor(x1) and xs.max() < np.ceil(x2) and ys.min() >= np.floor(y1) \
            and ys.max() < np.ceil(y2)


def test_masks_false_turns_them_off_and_a_name_turns_them_on(image):
    plain = OVDetector("demo", device="cpu", backend="torch", conf=0.05)
    plain.set_classes(CLASSES)
    assert plain.config.masks is None and plain.detect(image).mask is None
    on = plain.detect(image, masks="grabcut")
    assert on.mask is not None and len(on.mask) == len(on)
    assert plain.detect(image).mask is None  # per call only


def test_config_field_and_override(det, image):
    assert det.config.masks == "grabcut" and DetectorConfig().masks is None
    assert det.detect(image, masks=False).mask is None


def test_mask_rle_keeps_rles_instead_of_dense_masks(det, image):
    dense = det.detect(image)
    [sparse] = det.detect_batch([image], mask_rle=True)
    assert sparse.mask is None
    rles = sparse.data[rle.DATA_KEY]
    assert len(rles) == len(dense)
    for r, m in zip(rles, dense.mask):
        assert r["size"] == list(image.shape[:2]) and (rle.decode(r) == m).all()
    picked = sparse[np.arange(len(sparse)) % 2 == 0]  # RLEs follow the boxes through supervision's indexing
    assert list(picked.data[rle.DATA_KEY]) == list(rles[::2])


def test_tiled_detection_gets_masks_from_windows_around_the_boxes(det):
    big = render(image_rng(3, "val", 0), WorldSpec(canvas=(480, 320), object_px=(24, 48), objects=(4, 6)))[0]
    dets = det.detect(big, tile=160)
    assert dets.mask is not None and dets.mask.shape == (len(dets), 320, 480)
    whole = create_segmenter("grabcut").segment(big, dets.xyxy)
    for tiled, full in zip(dets.mask, whole):  # GrabCut in a window sees less background than on the whole image
        assert (tiled & full).sum() >= 0.8 * full.sum()
    assert sum(m.any() for m in dets.mask) >= len(dets) - 1


def test_a_segmenter_instance_is_used_as_given(det, image):
    class Boxes(Segmenter):
        name = "boxes"

        def _segment(self, img, boxes, rects):
            from ovdet.masks.base import MaskPart

            return [MaskPart(x0, y0, np.ones((y1 - y0, x1 - x0), bool)) for x0, y0, x1, y1 in rects.tolist()]

    dets = det.detect(image, masks=Boxes())
    areas = [(np.ceil(x2) - np.floor(x1)) * (np.ceil(y2) - np.floor(y1)) for x1, y1, x2, y2 in dets.xyxy]
    assert dets.mask.sum(axis=(1, 2)).tolist() == areas


def test_unknown_masks_name_is_a_clear_error(det, image):
    with pytest.raises(UnknownModelError, match="Masks come from one of: grabcut"):
        det.detect(image, masks="segment-anything")


def test_previews_draw_the_masks(det, image):
    dets = det.detect(image)
    boxes_only = draw(image, sv.Detections(xyxy=dets.xyxy, confidence=dets.confidence, class_id=dets.class_id,
                                           data=dets.data))
    with_masks = draw(image, dets)
    inside = dets.mask.any(axis=0)
    assert np.abs(with_masks.astype(int) - boxes_only.astype(int))[inside].mean() > 10  # tinted where the masks are


def test_detect_cli_prints_and_draws_masks(tmp_path, capsys):
    import json
    from pathlib import Path

    import cv2

    from ovdet.cli import main

    shape = Path(__file__).resolve().parents[1] / "samples" / "shapes" / "shape_1.jpg"
    argv = ["detect", str(shape), "--model", "demo", "--classes", ",".join(CLASSES), "--backend", "torch",
            "--device", "cpu", "--json"]
    assert main([*argv, "--masks", "grabcut", "--save", str(tmp_path / "on")]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["detections"] and all(rle.decode(d["segmentation"]).any() for d in row["detections"])
    assert main([*argv, "--save", str(tmp_path / "off")]) == 0
    assert all("segmentation" not in d for d in json.loads(capsys.readouterr().out)["detections"])
    on, off = cv2.imread(str(tmp_path / "on" / "shape_1.jpg")), cv2.imread(str(tmp_path / "off" / "shape_1.jpg"))
    assert np.abs(on.astype(int) - off.astype(int)).mean() > 0.5  # the masks are drawn
