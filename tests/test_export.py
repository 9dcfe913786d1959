"""`ovdet export`: baked-vocabulary files that ultralytics' own YOLO(path).predict runs, equal to ovdet's torch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import scene

from ovdet import OVDetector
from ovdet.cli import main
from ovdet.errors import ClassSpecError, ModelError
from ovdet.export import export_model

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["red circle", "blue square", "green triangle"]


@pytest.fixture
def f32_openvino(monkeypatch):
    """ultralytics compiles OpenVINO models with OpenVINO's default precision, which is bf16 on CPUs that have it;
    equality with the fp32 torch path is judged in f32 (bf16 is judged by accuracy, in the benchmarks)."""
    import openvino as ov

    class F32Core(ov.Core):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.set_property("CPU", {"INFERENCE_PRECISION_HINT": ov.Type.f32})

    monkeypatch.setattr(ov, "Core", F32Core)


def ultralytics_model(path: Path):
    from ultralytics import YOLO

    return YOLO(str(path), task="detect")


def assert_same(result, dets) -> None:
    """Same detections, one to one: each with a box ≤ 1e-2 px and a score ≤ 1e-4 away and the same class (boxes with
    tied scores may come in either order, so they are paired by an optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    boxes, conf, cls = result.boxes.xyxy.numpy(), result.boxes.conf.numpy(), result.boxes.cls.numpy().astype(int)
    assert len(dets) > 0 and len(boxes) == len(dets)
    cost = np.maximum(np.abs(dets.xyxy[:, None] - boxes[None]).max(2) / 1e-2,
                      np.abs(dets.confidence[:, None] - conf[None]) / 1e-4)
    cost[dets.class_id[:, None] != cls[None]] = np.inf
    rows, cols = linear_sum_assignment(np.minimum(cost, 1e9))
    assert cost[rows, cols].max() <= 1, f"unmatched: {dets.xyxy[rows[cost[rows, cols] > 1]]}"


def test_cli_onnx_export_of_the_demo_runs_in_ultralytics_as_ovdet_does(tmp_path, capsys):
    out = tmp_path / "demo-shapes.onnx"
    assert main(["export", "demo", "--format", "onnx", "--classes", ",".join(SHAPES), "--out", str(out)]) == 0
    assert f"exported {out} (onnx, fp32, imgsz 160, 3 classes baked in)" in capsys.readouterr().out
    image = np.ascontiguousarray(__import__("cv2").imread(str(ROOT / "samples" / "shapes.jpg")))  # square: same letterbox
    result = ultralytics_model(out).predict(image, verbose=False)[0]
    assert result.names == dict(enumerate(SHAPES))  # the class names travel in the file's metadata
    det = OVDetector("demo", device="cpu")
    det.set_classes(SHAPES)
    assert_same(result, det.detect(image))
    assert set(result.names[int(c)] for c in result.boxes.cls) == set(SHAPES)  # the demo finds its shapes


def test_openvino_dynamic_export_matches_the_torch_path_on_any_shape(tmp_path, f32_openvino):
    import cv2

    result = export_model("demo", "openvino", classes=SHAPES[::-1], out=tmp_path / "demo_openvino_model",
                          dynamic=True)
    assert result.path.is_dir() and (result.path / "metadata.yaml").is_file() and result.classes == SHAPES[::-1]
    det = OVDetector("demo", device="cpu", conf=0.1)
    det.set_classes(SHAPES[::-1])
    square = cv2.imread(str(ROOT / "samples" / "shapes.jpg"))
    wide = np.hstack([cv2.imread(str(ROOT / "samples" / "shapes" / f"shape_{i}.jpg")) for i in (1, 2)])
    yolo = ultralytics_model(result.path)
    for image in (square, wide, np.ascontiguousarray(square[40:280])):
        assert_same(yolo.predict(image, imgsz=160, conf=0.1, verbose=False)[0], det.detect(image))


def test_int8_openvino_export_calibrates_on_a_folder_and_loads_in_ultralytics(tmp_path, tiny_world_checkpoint,
                                                                              tiny_text_encoder):
    import cv2

    ckpt = tiny_world_checkpoint
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        cv2.imwrite(str(calib / f"{i}.jpg"), scene(160, 160, seed=10 + i))
    result = export_model(ckpt, "openvino", classes=["a", "b"], out=tmp_path / "q_openvino_model", imgsz=160,
                          precision="int8", calib=calib, text_model=tiny_text_encoder)
    xml = next(result.path.glob("*.xml")).read_text()
    assert "FakeQuantize" in xml  # quantized, not an fp32 copy
    boxes = ultralytics_model(result.path).predict(scene(160, 160, seed=2), conf=0.1, verbose=False)[0].boxes
    assert len(boxes) > 0 and set(boxes.cls.int().tolist()) <= {0, 1}


@pytest.mark.parametrize("argv, message", [
    (["--classes", "person|man,car"], "synonyms"),
    (["--classes", "person,!reflection"], "negatives"),
    (["--classes", "a", "--precision", "bf16"], "bf16 is a runtime setting"),
    (["--classes", "a", "--out", "x.onnx.tmp"], "ends in '.onnx'"),
    (["--classes", "a", "--format", "openvino", "--out", "x.onnx"], "_openvino_model"),
    (["--classes", "a", "--imgsz", "100"], "multiple of the model's stride"),
])
def test_cli_refuses_what_cannot_be_exported_with_a_clear_error(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdet: error:") and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_v1_models_and_engines_without_a_gpu_are_refused(tmp_path, tiny_text_encoder, monkeypatch):
    with pytest.raises(ModelError, match="only YOLO-World v2"):
        export_model("yolov8n-world.yaml", "onnx", classes=["a"], out=tmp_path / "v1.onnx", imgsz=160,
                     text_model=tiny_text_encoder)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        export_model("demo", "engine", classes=["a"], out=tmp_path / "x.engine")
    with pytest.raises(ClassSpecError, match="thresholds"):
        export_model("demo", "onnx", classes={"classes": [{"name": "a", "conf": 0.3}]}, out=tmp_path / "t.onnx")
    assert not list(tmp_path.iterdir())
