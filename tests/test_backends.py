"""Backends: OpenVINO and ONNX Runtime (fp32) compute what the torch path computes, for v1 and v2 models, any image
shape, batch and vocabulary size, without exporting again when the vocabulary changes; auto choice, clear errors,
and the compiled-model cache (second start loads, a corrupt entry is rebuilt)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from conftest import random_embeddings, random_world_model, scene
from ovdet import OVDetector
from ovdet.backends import graph
from ovdet.backends.cache import CompiledCache, CompiledCacheWarning
from ovdet.cli import main
from ovdet.errors import ModelError
from ovdet.weights.registry import DEMO_FILE
from ovdet.model.world import WorldDetector

EXPORTED = ("openvino", "onnxruntime")
KS = (1, 7, 80, 300)
SHAPES = [(120, 200), (240, 160), (96, 96)]  # non-square, portrait, square: one session sees them all
DEMO_CLASSES = "red circle|red disc,green triangle,blue square,!red square"


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    """One OVDET_HOME for the module's detectors, so each model is exported once per backend."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("backends_home")
    mp.setenv("OVDET_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def export_calls(module_home):
    """Counts LiveWorldGraph exports over the module (the backends call graph.export_onnx)."""
    calls = []
    real = graph.export_onnx
    mp = pytest.MonkeyPatch()
    mp.setattr(graph, "export_onnx", lambda *a, **k: calls.append(a) or real(*a, **k))
    yield calls
    mp.undo()


@pytest.fixture(scope="module", params=["yolov8n-worldv2.yaml", "yolov8n-world.yaml"], ids=["v2", "v1"])
def trio(request, module_home, export_calls):
    """torch, openvino and onnxruntime WorldDetectors on the same random weights, all fp32 (OpenVINO's precision auto
    would be bf16 on CPUs with native bf16)."""
    return {name: WorldDetector(random_world_model(request.param, seed=5), request.param, device="cpu",
                                backend=name, precision="fp32") for name in ("torch", *EXPORTED)}


def _assert_head_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    np.testing.assert_allclose(out[:, :4].numpy(), ref[:, :4].numpy(), rtol=0, atol=1e-2)  # box pixels
    np.testing.assert_allclose(out[:, 4:].numpy(), ref[:, 4:].numpy(), rtol=0, atol=1e-4)  # scores


def test_fp32_backends_equal_torch_for_every_shape_batch_and_vocabulary(trio, export_calls):
    images = [scene(h, w, seed=i) for i, (h, w) in enumerate(SHAPES)]
    batches = ([images[0]], images, [images[1]], [images[2], images[0], images[1]])  # batch 1 and 3, sizes vary
    before = len(export_calls)
    for k, batch in zip(KS, batches):  # the vocabulary changes between runs: no export after the first one
        for det in trio.values():
            det.set_text_embeddings(random_embeddings(k, seed=k))
        ref = trio["torch"].backend.run(trio["torch"].preprocess(batch, 160), trio["torch"]._txt_feats)
        assert ref.shape[:2] == (len(batch), 4 + k)
        for name in EXPORTED:
            det = trio[name]
            with torch.inference_mode():
                _assert_head_close(det.backend.run(det.preprocess(batch, 160), det._txt_feats), ref)
    assert len(export_calls) - before <= len(EXPORTED)  # one export per backend (none if the cache had it)
    for name in EXPORTED:
        assert trio[name].backend.exports <= 1


def test_shared_scoring_rules_work_on_every_backend(trio):
    """Synonyms (several rows per class), a negative row and per-class thresholds reduce the same on every backend."""
    emb = random_embeddings(6, seed=11)
    columns = [0, 0, 1, 2, 2, -1]
    images = [scene(160, 224, seed=3), scene(200, 120, seed=4)]
    reduced = {}
    for name, det in trio.items():
        det.set_text_embeddings(emb, columns=columns, reduce="max")
        with torch.inference_mode():
            raw = det.backend.run(det.preprocess(images, 160), det._txt_feats)
            reduced[name], conf = det.class_scores(raw, 0.25, class_conf=[0.2, 0.5, 0.3])
        assert reduced[name].shape[1] == 4 + 3 and conf == 0.2
    for name in EXPORTED:
        _assert_head_close(reduced[name], reduced["torch"])


@pytest.fixture(scope="module")
def demo_trio(module_home):
    if not DEMO_FILE.is_file():
        pytest.skip("the demo model is absent")
    return {name: OVDetector("demo", device="cpu", backend=name, precision="fp32") for name in ("torch", *EXPORTED)}


def _samples():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "samples"
    return [str(root / "shapes.jpg")] + sorted(str(p) for p in (root / "shapes").glob("*.jpg"))


def _assert_same_detections(a, b) -> None:
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.class_id, b.class_id)
    np.testing.assert_allclose(a.xyxy, b.xyxy, rtol=0, atol=1e-2)
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-4)


def test_demo_model_detects_the_same_on_every_backend(demo_trio):
    files = _samples()
    for classes in (DEMO_CLASSES, "red circle,green circle,blue circle,red triangle,blue triangle,green square,"
                                  "red square: 0.6"):  # synonyms + negative, then another K with a per-class threshold
        found = {}
        for name, det in demo_trio.items():
            det.set_classes(classes)
            found[name] = det.detect_batch(files, conf=0.2) + [det.detect(files[0], conf=0.2)]
        for name in EXPORTED:
            for a, b in zip(found["torch"], found[name]):
                _assert_same_detections(a, b)
    for name in EXPORTED:
        assert demo_trio[name].world.backend.exports <= 1
        assert (demo_trio[name].backend, demo_trio[name].precision) == (name, "fp32")


def test_openvino_follows_a_vocabulary_change_that_keeps_the_class_count(demo_trio):
    """Two classes, then two others: same K, so the same input shape; the new embeddings must still be used."""
    image = _samples()[0]  # a red circle, two blue squares, a green triangle (and a red triangle)
    torch_det, ov = demo_trio["torch"], demo_trio["openvino"]
    assert ov.backend == "openvino"  # explicit backend="openvino", not the auto choice
    found = []
    for classes in (["red circle", "blue square"], ["green triangle", "blue square"]):
        torch_det.set_classes(classes)
        ov.set_classes(classes)
        ref, got = torch_det.detect(image, conf=0.25), ov.detect(image, conf=0.25)
        _assert_same_detections(got, ref)
        assert list(got.data["class_name"]) == list(ref.data["class_name"])
        found.append(got)
    first, second = found
    assert sorted(first.data["class_name"]) == ["blue square", "blue square", "red circle"]
    assert sorted(second.data["class_name"]) == ["blue square", "blue square", "green triangle"]
    # class 0 now names another shape in another place: its box moved
    assert not np.allclose(first.xyxy[first.class_id == 0], second.xyxy[second.class_id == 0], atol=5)
    assert ov.world.backend.exports <= 1


def test_warm_set_classes_is_instant_on_every_backend(demo_trio, capsys):
    """Measured, not asserted (speed belongs to benchmarks/): printed with -s."""
    for name, det in demo_trio.items():
        det.set_classes("red circle,blue square")  # embeddings now cached
        det.detect(_samples()[0])
        start = time.perf_counter()
        for _ in range(20):
            det.set_classes("red circle,blue square")
        with capsys.disabled():
            print(f"\nwarm set_classes on {name}: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms")
        assert det.world.backend.exports <= 1


def test_auto_picks_openvino_on_cpu_and_says_so(tiny_world_checkpoint, tiny_text_encoder, monkeypatch):
    from ovdet.backends import openvino_backend

    monkeypatch.delenv("OVDET_BACKEND")
    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: ["FP32", "INT8"])
    det = OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu", imgsz=160)
    assert (det.backend, det.precision) == ("openvino", "fp32")
    assert "openvino fp32" in det.world.describe() and "auto: OpenVINO on a CPU" in det.world.describe()
    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: ["FP32", "BF16", "INT8"])
    det = OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu", imgsz=160)
    assert (det.backend, det.precision) == ("openvino", "bf16")
    assert "openvino bf16" in det.world.describe() and "precision auto: the CPU has native bf16" in \
        det.world.describe()
    monkeypatch.setenv("OVDET_BACKEND", "onnxruntime")
    assert OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu").backend == "onnxruntime"
    monkeypatch.delenv("OVDET_BACKEND")

    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    det = OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu")
    assert det.backend == "torch" and "openvino is not installed" in det.world.describe()


@pytest.mark.parametrize("kwargs, words", [
    ({"backend": "torch", "precision": "bf16"}, "backend='openvino'"),
    ({"backend": "torch", "precision": "fp16"}, "needs a GPU"),
    ({"backend": "onnxruntime", "precision": "int8"}, "--backend openvino for bf16 or int8"),
    ({"backend": "openvino", "precision": "fp16"}, "fp32, bf16, int8"),
    ({"backend": "tensorrt"}, "NVIDIA GPU"),
    ({"backend": "openvino", "device": "cuda"}, "CUDA is not available"),
    ({"backend": "coreml"}, "Unknown backend"),
    ({"precision": "fp8"}, "Unknown precision"),
    ({"half": True, "precision": "fp32"}, "contradicts"),
])
def test_unsupported_choices_are_clear_errors(tiny_world_checkpoint, kwargs, words):
    with pytest.raises(ModelError, match=words.replace("(", r"\(").replace(")", r"\)")):
        OVDetector(tiny_world_checkpoint, **{"device": "cpu", **kwargs})


def test_missing_runtime_or_bf16_says_what_to_do(tiny_world_checkpoint, monkeypatch):
    import sys

    from ovdet.backends import openvino_backend

    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(ModelError, match="no bf16 support.*fp32 or int8"):
        OVDetector(tiny_world_checkpoint, device="cpu", backend="openvino", precision="bf16")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r'pip install "ovdet\[onnx\]"'):
        OVDetector(tiny_world_checkpoint, device="cpu", backend="onnxruntime")


def test_second_start_loads_the_cache_and_a_corrupt_entry_is_rebuilt(tiny_world_checkpoint, tiny_text_encoder,
                                                                     capsys):
    def start():
        det = OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu", imgsz=96,
                         backend="openvino")
        det.set_classes("red box,blue ball")
        return det, det.detect(scene(90, 120), conf=0.05)

    first, dets = start()
    assert first.world.backend.build_info.cached is False and first.world.backend.exports == 1
    second, again = start()
    assert second.world.backend.build_info.cached is True and second.world.backend.exports == 0
    _assert_same_detections(dets, again) if len(dets) else None
    entry = second.world.backend.build_info.path
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "model.bin", "model.xml", "openvino_blobs"]
    assert {p.suffix for p in (entry / "openvino_blobs").iterdir()} == {".blob"}  # OpenVINO's compiled blobs, no pickle
    (entry / "model.bin").write_bytes((entry / "model.bin").read_bytes()[:1000])  # truncated weights
    with pytest.warns(CompiledCacheWarning, match="unusable.*rebuilding"):
        third, _ = start()
    assert third.world.backend.exports == 1 and third.world.backend.build_info.cached is False
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "compiled models:" in out and entry.name in out
    assert main(["cache", "clear", "--compiled"]) == 0
    assert "Removed 1 compiled model(s)" in capsys.readouterr().out
    assert CompiledCache().entries() == []


def test_cli_detect_on_openvino_says_which_backend_runs(demo_trio, module_home, monkeypatch, capsys):
    from ovdet.backends import resolve

    monkeypatch.setenv("OVDET_HOME", str(module_home))  # where demo_trio left the demo's compiled model
    files = _samples()[:2]
    assert main(["detect", *files, "--model", "demo", "--classes", "red circle,blue square", "--backend", "openvino",
                 "--json"]) == 0
    captured = capsys.readouterr()
    auto = resolve("openvino", "cpu")  # no --precision: the one OpenVINO picks on this CPU, and the line says why
    assert f"openvino {auto.precision}, " in captured.err and auto.precision_reason in captured.err
    assert [json.loads(line)["image"] for line in captured.out.splitlines()] == files


def test_annotate_int8_end_to_end_records_its_precision_for_resume(demo_trio, module_home, tmp_path, monkeypatch,
                                                                   capsys):
    import shutil
    from pathlib import Path

    monkeypatch.setenv("OVDET_HOME", str(module_home))
    shapes = Path(_samples()[1]).parent
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(shapes, src)
    args = ["annotate", str(src), "--classes", "red circle,blue square", "--out", str(out), "--model", "demo",
            "--backend", "openvino", "--calib", str(shapes), "--format", "coco"]
    assert main([*args, "--precision", "int8"]) == 0
    assert "openvino int8" in capsys.readouterr().err  # the summary line
    assert json.loads((out / "run.json").read_text())["settings"]["reduced_precision"] == "int8"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert main([*args, "--precision", "fp32"]) == 2  # detections would differ slightly: not mixed in one run
    assert "reduced_precision: int8 → none" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_reduced_precision_keeps_the_demo_accuracy(demo_trio, module_home, tmp_path, monkeypatch, precision):
    """A fast guard on 24 held-out images (the 200-image numbers are in the README, from
    benchmarks/accuracy_precisions.py): mAP50-95 within 0.02 of fp32."""
    from pathlib import Path

    from ovdet.backends.openvino_backend import cpu_capabilities
    from ovdet.jobs.evaluate import evaluate, load_dataset
    from ovdet.jobs.synth import WorldSpec, generate

    if precision == "bf16" and "BF16" not in cpu_capabilities():
        pytest.skip("this CPU has no bf16")
    monkeypatch.setenv("OVDET_HOME", str(module_home))
    data = load_dataset(generate(tmp_path / "world", train=1, val=24, seed=4242, spec=WorldSpec(imgsz=160),
                                 progress=False), split="val")
    fp32 = evaluate(demo_trio["openvino"], data, conf=0.001, progress=False).map50_95
    calib = Path(_samples()[1]).parent  # the annotate test above calibrated on these: its int8 model is cached
    det = OVDetector("demo", device="cpu", backend="openvino", precision=precision, calib=calib)
    reduced = evaluate(det, data, conf=0.001, progress=False).map50_95
    assert det.precision == precision and fp32 > 0.8
    assert abs(reduced - fp32) <= 0.02, (precision, reduced, fp32)
    if precision == "int8":
        _cached_int8_starts_without_nncf(calib, data.images[0].path, monkeypatch)


def _cached_int8_starts_without_nncf(calib, image, monkeypatch):
    """nncf (~2 s to import) is needed to quantize, not to run: a start whose int8 model is cached (the one just
    used) never imports it; without nncf installed, int8 is refused at construction with the install command."""
    import sys

    for name in [m for m in sys.modules if m == "nncf" or m.startswith("nncf.")]:
        monkeypatch.delitem(sys.modules, name)  # as in a fresh process (monkeypatch puts them back)
    det = OVDetector("demo", device="cpu", backend="openvino", precision="int8", calib=calib)
    det.set_classes("red circle")
    det.detect(image)
    assert det.world.backend.exports == 0 and det.precision == "int8"
    assert not [m for m in sys.modules if m == "nncf" or m.startswith("nncf.")]
    monkeypatch.setitem(sys.modules, "nncf", None)  # not installed
    with pytest.raises(ModelError, match=r"'nncf' package, which is not installed: pip install \"ovdet\[int8\]\""):
        OVDetector("demo", device="cpu", backend="openvino", precision="int8", calib=calib)


def _tensorrt_ready() -> bool:
    from ovdet.backends.tensorrt import available

    return available()


@pytest.mark.skipif(not _tensorrt_ready(), reason="needs an NVIDIA GPU with CUDA and the tensorrt package")
def test_tensorrt_detects_what_torch_does_on_the_gpu(demo_trio, module_home, monkeypatch):
    """fp32 engines (TensorRT may use TF32 inside: scores within 1e-3) and fp16 (same boxes by IoU) on the demo."""
    import supervision as sv

    monkeypatch.delenv("OVDET_BACKEND")
    files = _samples()
    ref = OVDetector("demo", device="cuda", backend="torch", precision="fp32")
    auto = OVDetector("demo", device="cuda")
    assert (auto.backend, auto.precision) == ("tensorrt", "fp16")
    fp32 = OVDetector("demo", device="cuda", backend="tensorrt", precision="fp32")
    for det in (ref, auto, fp32):
        det.set_classes(DEMO_CLASSES)
    for a, b, c in zip(ref.detect_batch(files, conf=0.2), fp32.detect_batch(files, conf=0.2),
                       auto.detect_batch(files, conf=0.2)):
        assert len(a) == len(b) == len(c) > 0
        np.testing.assert_allclose(a.xyxy, b.xyxy, rtol=0, atol=5e-2)
        np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-3)
        assert sv.box_iou_batch(a.xyxy, c.xyxy).max(1).min() > 0.95
    auto.set_classes("red circle")  # another K: the same engine
    assert len(auto.detect(files[0], conf=0.2)) >= 0 and auto.world.backend.exports <= 1
