"""OVDetector facade: inputs it accepts, errors a user can cause, and the `ovdet detect` command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import outline_difference, scene
from ovdet import OVDetector
from ovdet.cli import main
from ovdet.errors import ClassSpecError, ImageReadError, InvalidImageError, UnknownModelError, WeightsNotFoundError


@pytest.fixture
def detector(tiny_detector):
    tiny_detector.set_classes(["red circle", "blue square"])
    return tiny_detector


def test_set_classes_encodes_with_text_tower(detector, tiny_text_encoder):
    assert detector.classes == ["red circle", "blue square"]
    expected = tiny_text_encoder.encode(["red circle", "blue square"])
    assert np.allclose(detector.world._txt_feats[0].numpy(), expected.numpy(), atol=1e-6)


def test_same_result_for_path_array_and_pil(detector, tmp_path):
    image = scene(120, 160, seed=1)
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), image)
    pil = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    results = [detector.detect(x, conf=0.01) for x in (image, path, str(path), pil)]
    assert len(results[0]) > 0
    for other in results[1:]:
        np.testing.assert_array_equal(other.xyxy, results[0].xyxy)
        np.testing.assert_array_equal(other.class_id, results[0].class_id)


def test_detections_are_supervision_with_names(detector):
    dets = detector.detect(scene(120, 160), conf=0.01, max_det=5)
    assert 0 < len(dets) <= 5
    assert dets.xyxy.dtype == np.float32 and dets.xyxy.shape == (len(dets), 4)
    assert set(dets.data["class_name"]) <= {"red circle", "blue square"}
    assert all(detector.classes[c] == n for c, n in zip(dets.class_id, dets.data["class_name"]))
    h, w = 120, 160
    assert (dets.xyxy[:, [0, 2]] >= 0).all() and (dets.xyxy[:, [0, 2]] <= w).all()
    assert (dets.xyxy[:, [1, 3]] >= 0).all() and (dets.xyxy[:, [1, 3]] <= h).all()


def test_conf_knob_filters(detector):
    image = scene(120, 160)
    low, high = detector.detect(image, conf=0.01), detector.detect(image, conf=0.5)
    assert len(high) <= len(low)
    assert (high.confidence >= 0.5).all() and (low.confidence >= 0.01).all()


def test_detect_batch_equals_single_calls_for_same_shapes(detector):
    images = [scene(120, 160, seed=s) for s in range(3)]
    batch = detector.detect_batch(images, conf=0.01)
    for image, dets in zip(images, batch):
        single = detector.detect(image, conf=0.01)
        assert len(dets) > 10 and len(single) > 10
        # random heads give many near-tied boxes whose NMS fate flips with float noise: compare the top scores
        np.testing.assert_allclose(np.sort(dets.confidence)[-10:], np.sort(single.confidence)[-10:], atol=1e-4)
    assert detector.detect_batch([]) == []


@pytest.mark.parametrize("classes, message", [
    ([], "empty"),
    (["person", "  "], "blank"),
    (["person", "Person "], "twice"),
    ([1, 2], "list of strings"),
])
def test_bad_class_lists(detector, classes, message):
    with pytest.raises(ClassSpecError, match=message):
        detector.set_classes(classes)
    assert detector.classes == ["red circle", "blue square"]  # unchanged after a refused call


def test_comma_string_is_split(detector):
    detector.set_classes("cat, dog")
    assert detector.classes == ["cat", "dog"]


def test_bad_images(detector, tmp_path):
    with pytest.raises(ImageReadError, match="missing.jpg"):
        detector.detect(tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.jpg"):
        detector.detect(text)
    with pytest.raises(InvalidImageError):
        detector.detect(np.zeros((10, 10, 3), np.float64))
    with pytest.raises(InvalidImageError):
        detector.detect(np.zeros((10, 10, 3, 2), np.uint8))
    with pytest.raises(InvalidImageError):
        detector.detect(12345)


def test_unknown_model_name():
    with pytest.raises(UnknownModelError, match="yolov8s-worldv2"):
        OVDetector("no-such-model", device="cpu")


def test_missing_weights_offline_is_clear():
    with pytest.raises(WeightsNotFoundError, match="ovdet weights import"):
        OVDetector("yolov8s-worldv2", device="cpu")


def test_cli_detect_end_to_end(tiny_world_checkpoint, tiny_text_encoder, tmp_path, capsys, monkeypatch):
    text_dir = tmp_path / "text"
    tiny_text_encoder.model.save_pretrained(text_dir)
    image = tmp_path / "street.png"
    cv2.imwrite(str(image), scene(120, 160))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    args = ["detect", str(image), str(bad), "--classes", "red circle,blue square", "--model",
            str(tiny_world_checkpoint), "--text-model", str(text_dir), "--device", "cpu", "--imgsz", "160",
            "--conf", "0.01", "--json", "--save", str(tmp_path / "out")]
    assert main(args) == 1  # one image failed, the other was processed
    out, err = capsys.readouterr()
    record = json.loads(out.strip().splitlines()[0])
    assert record["image"] == str(image) and len(record["detections"]) > 0
    assert {d["class"] for d in record["detections"]} <= {"red circle", "blue square"}
    assert "broken.jpg" in err
    # the annotated copy (a PNG, like its input: lossless) has the boxes drawn: on a box's outline it differs from
    # the image (which it would equal pixel for pixel with nothing drawn)
    saved = cv2.imread(str(tmp_path / "out" / "street.png"))
    plain = cv2.imread(str(image))
    assert saved.shape == plain.shape and not np.array_equal(saved, plain)
    for d in record["detections"][:3]:
        assert outline_difference(saved, plain, d["xyxy"]) > 20, d


def test_cli_detect_without_weights_offline(tmp_path, capsys):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), scene(64, 64))
    assert main(["detect", str(image), "--classes", "person"]) == 2
    assert "ovdet weights import" in capsys.readouterr().err


def test_the_demo_detects_at_the_size_it_was_trained_at():
    """ovdet/assets/README.md: the demo was trained at imgsz 160 and runs at that size unless told otherwise (at
    640 every shape would look four times larger than anything it saw)."""
    import re
    from pathlib import Path

    from ovdet.weights.registry import DEMO_FILE

    assert DEMO_FILE.is_file(), f"the demo model {DEMO_FILE} ships with ovdet"
    notes = (Path(__file__).resolve().parents[1] / "ovdet" / "assets" / "README.md").read_text(encoding="utf-8")
    trained = {int(size) for size in re.findall(r"\bimgsz (\d+)", notes)}
    assert trained == {160}, trained
    det = OVDetector("demo", device="cpu")
    assert det.imgsz == det.world.train_imgsz == 160
    det.set_classes(["red circle", "blue square", "green triangle"])
    image = str(Path(__file__).resolve().parents[1] / "samples" / "shapes.jpg")
    default, at_160 = det.detect(image), det.detect(image, imgsz=160)
    np.testing.assert_array_equal(default.xyxy, at_160.xyxy)
    assert sorted(default.data["class_name"]) == ["blue square", "blue square", "green triangle", "red circle"]
