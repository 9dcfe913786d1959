"""`ovdet export`: baked-vocabulary files that ultralytics' own YOLO(path).predict runs, equal to ovdet's torch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import scene

from ovdet import Exemplar, OVDetector
from ovdet.cli import main
from ovdet.errors import ClassSpecError, ModelError
from ovdet.jobs.export import export_model

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
    tied scores may come in either order, so they are paired by an optimal assignment). `result`: an ultralytics
    Results or another sv.Detections."""
    from scipy.optimize import linear_sum_assignment

    if hasattr(result, "boxes"):
        boxes, conf, cls = result.boxes.xyxy.numpy(), result.boxes.conf.numpy(), result.boxes.cls.numpy().astype(int)
    else:
        boxes, conf, cls = result.xyxy, result.confidence, result.class_id
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
    image = __import__("cv2").imread(str(ROOT / "samples" / "shapes.jpg"))  # square: the same letterbox on both sides
    result = ultralytics_model(out).predict(image, verbose=False)[0]
    assert result.names == dict(enumerate(SHAPES))  # the class names travel in the file's metadata
    det = OVDetector("demo", device="cpu", backend="torch")
    det.set_classes(SHAPES)
    assert_same(result, det.detect(image))
    assert set(result.names[int(c)] for c in result.boxes.cls) == set(SHAPES)  # the demo finds its shapes


def test_openvino_dynamic_export_matches_the_torch_path_on_any_shape(tmp_path, f32_openvino):
    import cv2

    result = export_model("demo", "openvino", classes=SHAPES[::-1], out=tmp_path / "demo_openvino_model",
                          dynamic=True)
    assert result.path.is_dir() and (result.path / "metadata.yaml").is_file() and result.classes == SHAPES[::-1]
    det = OVDetector("demo", device="cpu", conf=0.1, backend="torch")
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


def foreign_runtime_detect(run, image: np.ndarray, embeddings: np.ndarray, imgsz: int, conf: float):
    """What the README tells any runtime to do with a live graph: letterbox, RGB 0..1, run with the embeddings, NMS,
    boxes back to the image (here with ultralytics' helpers)."""
    import torch
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import nms, ops

    boxed = LetterBox((imgsz, imgsz), auto=True, stride=32)(image=image)
    batch = np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255
    raw = run(batch, embeddings[None].astype(np.float32))
    assert raw.shape == (1, 4 + len(embeddings), raw.shape[2]) and raw.dtype == np.float32
    det = nms.non_max_suppression(torch.from_numpy(raw), conf, 0.7, max_det=300)[0]
    det[:, :4] = ops.scale_boxes(batch.shape[2:], det[:, :4], image.shape)
    return det.numpy()


def test_live_onnx_export_runs_in_onnxruntime_with_any_vocabulary(tmp_path, monkeypatch, capsys):
    import cv2
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)
    assert main(["export", "demo", "--format", "onnx"]) == 0  # no --classes: the live graph, default name
    assert "live vocabulary" in capsys.readouterr().out
    session = ort.InferenceSession("demo-world-live.onnx", providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["vocabulary"] == "live" and meta["model"].startswith("demo-world@") and meta["imgsz"] == "160"
    assert [i.name for i in session.get_inputs()] == ["images", "txt_feats"]
    image = np.hstack([cv2.imread(str(ROOT / "samples" / "shapes" / f"shape_{i}.jpg")) for i in (1, 2)])
    det = OVDetector("demo", device="cpu", conf=0.2, backend="torch")
    for vocabulary in (["red circle"], SHAPES):  # K = 1, then K = 3, with the same file
        assert main(["classes", "encode", ",".join(vocabulary), "--model", "demo", "--save", "emb.npy"]) == 0
        ours = foreign_runtime_detect(lambda x, t: session.run(None, {"images": x, "txt_feats": t})[0], image,
                                      np.load("emb.npy"), 160, 0.2)
        det.set_classes(vocabulary)
        expected = det.detect(image)
        assert len(expected) > 0 and len(ours) == len(expected)
        np.testing.assert_allclose(ours[:, :4], expected.xyxy, atol=1e-2)
        np.testing.assert_allclose(ours[:, 4], expected.confidence, atol=1e-4)
        np.testing.assert_array_equal(ours[:, 5].astype(int), expected.class_id)
    # a class shown by example is one more row of the same input: the same graph, no re-export
    ref = tmp_path / "ref.jpg"  # class files name their images relative to themselves
    ref.write_bytes((ROOT / "samples" / "shapes" / "shape_1.jpg").read_bytes())
    det.set_classes(["red circle"])
    box = [int(round(float(v))) for v in det.detect(cv2.imread(str(ref))).xyxy[0]]
    (tmp_path / "shown.yaml").write_text(
        f"classes:\n  - name: blue square\n  - name: zorblax\n    prompts: []\n"
        f"    exemplars: [{{image: ref.jpg, box: {box}}}]\n", encoding="utf-8")
    assert main(["classes", "encode", "shown.yaml", "--model", "demo", "--save", "emb.npy"]) == 0
    ours = foreign_runtime_detect(lambda x, t: session.run(None, {"images": x, "txt_feats": t})[0], image,
                                  np.load("emb.npy"), 160, 0.2)
    det.set_classes(["blue square", Exemplar(ref, box=tuple(box), name="zorblax")])
    expected = det.detect(image)
    assert 1 in expected.class_id.tolist() and len(ours) == len(expected)  # zorblax (the red circles) found
    np.testing.assert_allclose(ours[:, :4], expected.xyxy, atol=1e-2)
    np.testing.assert_allclose(ours[:, 4], expected.confidence, atol=1e-4)
    np.testing.assert_array_equal(ours[:, 5].astype(int), expected.class_id)


def test_live_openvino_fp16_export_holds_an_ir_pair_with_the_contract(tmp_path):
    import openvino as ov

    result = export_model("demo", "openvino", out=tmp_path / "live.xml", precision="fp16")
    assert result.classes is None and (tmp_path / "live.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.bin", "live.xml"]  # no temporary left behind
    model = ov.Core().read_model(str(result.path))
    assert model.get_rt_info(["ovdet", "vocabulary"]).astype(str) == "live"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for k in (1, 5):
        out = compiled({"images": np.random.rand(2, 3, 96, 160).astype(np.float32),
                        "txt_feats": np.ones((1, k, 512), np.float32) / np.sqrt(512)})[0]
        assert out.shape == (2, 4 + k, (12 * 20 + 6 * 10 + 3 * 5)) and 0 <= out[:, 4:].min() <= out[:, 4:].max() <= 1


def _tensorrt_ready() -> bool:
    from ovdet.backends.tensorrt import available

    return available()


@pytest.mark.skipif(not _tensorrt_ready(), reason="needs an NVIDIA GPU with CUDA and the tensorrt package")
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_live_engine_export_runs_any_vocabulary_like_torch(tmp_path, precision, atol):
    import torch

    from ovdet.backends.tensorrt import EngineRunner, Profile

    result = export_model("demo", "engine", out=tmp_path / "live.engine", precision=precision)
    runner = EngineRunner(result.path.read_bytes(), torch.device("cuda"), Profile(imgsz=160))
    det = OVDetector("demo", device="cpu", backend="torch")
    for k, (b, h, w) in ((1, (1, 160, 160)), (9, (3, 96, 224))):
        det.set_classes([f"shape {i}" for i in range(k)])
        images, txt = torch.rand(b, 3, h, w), det.world._txt_feats.float()
        with torch.inference_mode():
            expected = det.world.model.float().predict(images.contiguous(), txt_feats=txt)[0]
        got = runner(images.cuda(), txt.cuda()).cpu()
        assert got.shape == expected.shape
        torch.testing.assert_close(got[:, 4:], expected[:, 4:], atol=atol, rtol=0)
        torch.testing.assert_close(got[:, :4], expected[:, :4], atol=atol * 160, rtol=0)


@pytest.mark.skipif(not _tensorrt_ready(), reason="needs an NVIDIA GPU with CUDA and the tensorrt package")
def test_tensorrt_backend_equals_torch_and_keeps_the_vocabulary_live(tiny_world_checkpoint, tiny_text_encoder):
    ref = OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu", backend="torch", imgsz=160,
                     conf=0.1)
    trt = OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cuda", backend="tensorrt",
                     precision="fp32", imgsz=160, conf=0.1)
    images = [scene(160, 160, seed=2), scene(480, 640, seed=3), scene(300, 200, seed=4)]
    for classes in ([f"thing {i}" for i in range(7)], ["thing 3"], [f"thing {i}" for i in range(80)]):
        ref.set_classes(classes)
        trt.set_classes(classes)
        for expected, got in zip(ref.detect_batch(images[:1]) + [ref.detect(im) for im in images[1:]],
                                 trt.detect_batch(images[:1]) + [trt.detect(im) for im in images[1:]]):
            assert_same(got, expected)
    assert trt.world.backend.exports == 1  # three vocabularies, one engine
