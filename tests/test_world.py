"""ovdet's detect equals ultralytics' own YOLOWorld predict on the same weights, embeddings and images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ultralytics import YOLOWorld
from ultralytics.utils import NUM_THREADS

from conftest import random_embeddings, random_world_model, save_world_checkpoint, scene
from ovdet import OVDetector
from ovdet.errors import ModelError, WeightsCorruptError
from ovdet.util.device import select_device

NAMES = [f"class {i}" for i in range(20)]


def reference_predict(path, embeddings, images, conf, iou):
    """Ultralytics predict with the text embeddings set on the model (its own CLIP path needs the network)."""
    yolo = YOLOWorld(str(path))
    yolo.model.txt_feats = embeddings[None].clone()
    yolo.model.model[-1].nc = len(embeddings)
    yolo.model.names = {i: n for i, n in enumerate(NAMES[: len(embeddings)])}
    return yolo.predict(images, conf=conf, iou=iou, device="cpu", verbose=False)


@pytest.fixture(autouse=True)
def _same_threads_as_ultralytics():
    """Ultralytics predict sets torch's CPU thread count; compare both under the same one (reduction order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["yolov8s-worldv2.yaml", "yolov8s-world.yaml"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("fidelity") / request.param.replace(".yaml", ".pt")
    save_world_checkpoint(random_world_model(request.param, seed=1), path)
    return path


def assert_same(ours, ref):
    boxes = ref.boxes
    ref_xyxy, ref_conf, ref_cls = boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy().astype(int)
    order_ours = np.lexsort((ours.class_id, ours.confidence, *ours.xyxy.T[::-1]))
    order_ref = np.lexsort((ref_cls, ref_conf, *ref_xyxy.T[::-1]))
    assert len(ours) == len(ref_conf)
    np.testing.assert_allclose(ours.xyxy[order_ours], ref_xyxy[order_ref], atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours.confidence[order_ours], ref_conf[order_ref], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ours.class_id[order_ours], ref_cls[order_ref])


def test_detect_matches_ultralytics_predict(checkpoint):
    emb = random_embeddings(len(NAMES), seed=2)
    images = [scene(480, 640, seed=3), scene(375, 500, seed=4)]
    det = OVDetector(checkpoint, device="cpu", imgsz=640)
    det.set_embeddings(NAMES, emb)
    for image in images:
        ref = reference_predict(checkpoint, emb, [image], conf=0.25, iou=0.7)[0]  # a list is one batch there
        ours = det.detect(image, conf=0.25, iou=0.7)
        assert len(ours) > 5, "fixture must produce detections for the comparison to mean something"
        assert_same(ours, ref)
        assert list(ours.data["class_name"]) == [NAMES[i] for i in ours.class_id]


def test_detect_batch_matches_ultralytics_batch(checkpoint):
    emb = random_embeddings(7, seed=5)
    images = [scene(360, 480, seed=6), scene(360, 480, seed=7), scene(300, 700, seed=8)]
    det = OVDetector(checkpoint, device="cpu", conf=0.3, iou=0.5)
    det.set_embeddings(NAMES[:7], emb)
    refs = reference_predict(checkpoint, emb, images, conf=0.3, iou=0.5)
    batch = det.detect_batch(images)
    assert len(batch) == 3
    for ours, ref in zip(batch, refs):
        assert_same(ours, ref)


def test_changing_embeddings_changes_detections(tiny_world_checkpoint):
    det = OVDetector(tiny_world_checkpoint, device="cpu", imgsz=160, conf=0.05)
    image = scene(120, 160, seed=9)
    det.set_embeddings(["a", "b"], random_embeddings(2, seed=1))
    first = det.detect(image)
    det.set_embeddings(["c", "d", "e"], random_embeddings(3, seed=2))
    second = det.detect(image)
    assert det.classes == ["c", "d", "e"]
    assert set(second.data["class_name"]) <= {"c", "d", "e"} and len(second) > 0
    assert not np.array_equal(first.confidence, second.confidence[: len(first)])


def test_empty_result_is_well_formed(tiny_world_checkpoint):
    det = OVDetector(tiny_world_checkpoint, device="cpu", imgsz=160)
    det.set_embeddings(["thing"], random_embeddings(1))
    dets = det.detect(np.zeros((64, 64, 3), np.uint8), conf=0.9999)
    assert len(dets) == 0 and dets.xyxy.shape == (0, 4) and len(dets.data["class_name"]) == 0


def test_model_id_is_stable_and_weight_sensitive(tiny_world_checkpoint, tmp_path):
    a = OVDetector(tiny_world_checkpoint, device="cpu").model_id
    assert a == OVDetector(tiny_world_checkpoint, device="cpu").model_id
    other = tmp_path / "tiny-worldv2.pt"
    save_world_checkpoint(random_world_model("yolov8n-worldv2.yaml", seed=5), other)
    assert OVDetector(other, device="cpu").model_id != a


def test_yaml_config_builds_random_model():
    det = OVDetector("yolov8n-worldv2.yaml", device="cpu", imgsz=160)
    det.set_embeddings(["x"], random_embeddings(1))
    assert len(det.detect(np.zeros((100, 100, 3), np.uint8))) == 0  # fresh head: scores near sigmoid(-10)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            select_device("cuda")
        with pytest.raises(ModelError, match="needs a GPU"):
            OVDetector("yolov8n-worldv2.yaml", device="cpu", half=True)


def _fresh(code: str, **env: str) -> str:
    """What `python -c code` prints in a fresh process (torch not imported unless the code does)."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.parametrize("env", [{}, {"OMP_NUM_THREADS": "1"}])
def test_device_and_threads_known_without_torch_are_what_torch_says(env):
    """The warm exported path names the device and torch's default thread count without importing torch; both must be
    what torch itself would say (a fresh process each, as torch's thread count is per process)."""
    probe = ("import sys; from ovdet.util.device import default_threads, device_name, only_cpu_here; "
             "print(device_name('cpu'), device_name('auto') if only_cpu_here() else '-', default_threads(), "
             "'torch' in sys.modules); import torch; print(torch.get_num_threads())")  # then what torch says
    ours, torch_says = _fresh(probe, **env).splitlines()
    cpu, auto, threads, loaded = ours.split()
    assert (cpu, threads, loaded) == ("cpu", torch_says, "False")
    assert auto in ("-", str(select_device("auto")))


def test_a_gpu_driver_makes_device_auto_ask_torch(monkeypatch, tmp_path):
    import sys

    import ovdet.util.device as devices

    asked = []
    monkeypatch.setattr(devices, "select_device", lambda device: asked.append(device) or torch.device("cpu"))
    monkeypatch.delitem(sys.modules, "torch")  # as in a process that has not imported it (put back after the test)
    monkeypatch.setattr(devices.platform, "system", lambda: "Linux")
    monkeypatch.setattr(devices, "NVIDIA_DRIVER", str(tmp_path / "no-driver"))
    monkeypatch.setattr(devices, "ROCM_DRIVER", str(tmp_path / "no-kfd"))
    assert devices.device_name("auto") == "cpu" and asked == []  # no driver: the CPU, without torch
    driver = tmp_path / "version"
    driver.write_text("NVRM version: 550.0\n")
    monkeypatch.setattr(devices, "NVIDIA_DRIVER", str(driver))
    assert devices.device_name("auto") == "cpu" and asked == ["auto"]  # a driver: torch decides
    assert devices.device_name("cuda:1") == "cpu" and asked == ["auto", "cuda:1"]  # any GPU name: torch checks it


def test_truncated_and_foreign_checkpoints(tiny_world_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_world_checkpoint.read_bytes()[:5000])
    with pytest.raises(WeightsCorruptError, match="truncated"):
        OVDetector(truncated, device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, foreign)
    with pytest.raises(WeightsCorruptError, match="not a YOLO-World model"):
        OVDetector(foreign, device="cpu")


def test_detect_before_set_classes(tiny_world_checkpoint):
    det = OVDetector(tiny_world_checkpoint, device="cpu")
    with pytest.raises(ModelError, match="set_classes"):
        det.detect(np.zeros((32, 32, 3), np.uint8))


@pytest.mark.parametrize("cfg", ["yolov8n-world.yaml", "yolov8n-worldv2.yaml"], ids=["v1", "v2"])
def test_nms_iou_is_used_on_v1_and_v2_models(cfg):
    """A lower NMS iou removes more overlapping boxes, on v1 models as on v2 (the iou given per call, else the
    constructor's)."""
    det = OVDetector(random_world_model(cfg, seed=3), device="cpu", imgsz=160, conf=0.05, iou=0.9)
    det.set_embeddings(NAMES[:3], random_embeddings(3, seed=4))
    image = scene(160, 160, seed=5)
    counts = [len(det.detect(image, iou=iou)) for iou in (0.1, 0.5, 0.9)]
    assert 0 < counts[0] < counts[1] < counts[2], counts
    assert len(det.detect(image)) == counts[2]  # the constructor's iou=0.9
