"""DetectorConfig: one options object behind OVDetector's keyword arguments, cheap to import, shipped to workers."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ovdet.config import DEFAULT_MODEL, DetectorConfig
from ovdet.detector import OVDetector
from ovdet.errors import ModelError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red circle", "blue square", "green triangle"]


def test_the_documented_keyword_arguments_and_defaults_are_the_config_fields():
    """README's `OVDetector(model="yolov8s-worldv2", text_model=None, device="auto", ...)` line names the fields and
    their defaults; trust_weights is the one it leaves out."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("det = OVDetector(model=")
    call = readme[start:readme.index(")", start) + 1].replace("det = ", "")
    documented = eval(call.replace("OVDetector", "dict"))  # noqa: S307 - our own README
    defaults = {f.name: f.default for f in dataclasses.fields(DetectorConfig)}
    assert documented == {k: v for k, v in defaults.items() if k != "trust_weights"}
    assert defaults["trust_weights"] is False and defaults["model"] == DEFAULT_MODEL


def test_every_field_is_documented():
    source = inspect.getsource(DetectorConfig)
    for name in DetectorConfig.names():
        assert f'{name}: ' in source
        after = source.split(f"\n    {name}: ", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"{name} has no docstring"


def test_replace_checks_names_and_keeps_the_config_frozen():
    cfg = DetectorConfig(model="demo")
    assert cfg.replace(conf=0.5) == DetectorConfig(model="demo", conf=0.5) and cfg.conf == 0.25
    with pytest.raises(TypeError, match="'confidence'.*conf"):
        cfg.replace(confidence=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.conf = 0.1  # type: ignore[misc]


def test_importing_the_config_loads_no_heavy_module():
    code = ("import sys; from ovdet import DetectorConfig; DetectorConfig(); "
            "print(sorted(m for m in ('torch', 'ultralytics', 'transformers', 'cv2', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def image():
    return cv2.imread(str(REPO / "samples" / "shapes.jpg"))


def test_keywords_config_and_from_config_build_the_same_detector(image):
    by_keywords = OVDetector("demo", device="cpu", conf=0.1, max_det=4, imgsz=192)
    cfg = DetectorConfig(model="demo", device="cpu", conf=0.1, max_det=4, imgsz=192)
    by_config, by_from = OVDetector(config=cfg), OVDetector.from_config(cfg)
    assert by_keywords.config == by_config.config == by_from.config == cfg
    assert (by_config.conf, by_config.max_det, by_config.imgsz) == (0.1, 4, 192)
    results = []
    for det in (by_keywords, by_config, by_from):
        det.set_classes(CLASSES)
        results.append(det.detect(image))
    assert len(results[0]) > 0
    for other in results[1:]:
        np.testing.assert_array_equal(other.xyxy, results[0].xyxy)
        np.testing.assert_array_equal(other.confidence, results[0].confidence)


def test_keywords_beside_a_config_override_it():
    det = OVDetector("demo", config=DetectorConfig(model="yolov8s-worldv2", conf=0.3, device="cpu"), max_det=7)
    assert det.config == DetectorConfig(model="demo", conf=0.3, max_det=7, device="cpu")
    assert (det.conf, det.max_det) == (0.3, 7)
    with pytest.raises(TypeError, match="unknown detector option 'bogus'"):
        OVDetector("demo", bogus=1)


def test_a_payload_rebuilds_the_same_detector_elsewhere(image):
    det = OVDetector("demo", device="cpu", imgsz=192)
    with pytest.raises(ModelError, match="set_classes"):
        det.worker_payload()
    det.set_classes("red circle|red disc, blue square, !green triangle")
    payload = det.worker_payload()
    assert payload.imgsz == 192 and payload.spec == det.class_spec
    assert next(payload.model.parameters()).device.type == "cpu"
    rebuilt = OVDetector.from_payload(payload, DetectorConfig(device="cpu", conf=0.05))
    assert rebuilt.imgsz == 192 and rebuilt.classes == det.classes and rebuilt.conf == 0.05
    a, b = det.detect(image, conf=0.05), rebuilt.detect(image)
    assert len(a) > 0
    np.testing.assert_array_equal(a.xyxy, b.xyxy)
    np.testing.assert_array_equal(a.class_id, b.class_id)
