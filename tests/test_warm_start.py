"""A warm start reads nothing it does not run: with the compiled model and the checkpoint's facts cached, an exported
backend detects without reading the weights, a new prompt reads only the embedded text tower, and anything that
needs the weights (a missing compiled model, the torch backend) reads them once, with the same result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ovdet.model.world as world
from conftest import random_world_model, scene
from ovdet import OVDetector
from ovdet.backends.cache import CompiledCache
from ovdet.errors import OVDetWarning
from ovdet.model.facts import facts_path
from ovdet.weights.checkpoint import TEXT_ENCODER_KEY

CLASSES = "red box,blue ball"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_text_encoder):
    """A tiny checkpoint that embeds its text tower, as `ovdet train` writes them (and as the demo model is)."""
    path = tmp_path_factory.mktemp("warm") / "tiny-tower.pt"
    torch.save({"model": random_world_model("yolov8n-worldv2.yaml", seed=3), "train_args": {"imgsz": 96},
                TEXT_ENCODER_KEY: tiny_text_encoder.to_state()}, path)
    return path


@pytest.fixture
def reads(monkeypatch):
    """Counts the checkpoint reads of ovdet.model.world."""
    calls = []
    real = world.load_world_checkpoint
    monkeypatch.setattr(world, "load_world_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _start(checkpoint, classes=CLASSES, **kwargs):
    det = OVDetector(checkpoint, device="cpu", **{"backend": "openvino", "precision": "fp32", **kwargs})
    det.set_classes(classes)
    return det, det.detect(scene(90, 120), conf=0.05)


def _same(a, b):
    assert len(a) == len(b)
    np.testing.assert_allclose(a.xyxy, b.xyxy, rtol=0, atol=1e-3)
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-6)


def test_a_warm_start_on_an_exported_backend_reads_no_weights(checkpoint, reads):
    cold, found = _start(checkpoint)
    assert len(reads) == 1 and facts_path(checkpoint).is_file()
    warm, again = _start(checkpoint)
    assert len(reads) == 1 and not warm.world.model_loaded  # nothing read: facts, cached embeddings, compiled model
    _same(found, again)
    assert warm.imgsz == cold.imgsz == 96 and warm.model_id == cold.model_id
    assert (warm.world.stride, warm.world.embed_dim) == (cold.world.stride, cold.world.embed_dim)
    assert warm.embeddings_source == cold.embeddings_source  # the embedded tower's identity, without reading it

    warm.set_classes("green ring")  # a prompt the cache does not hold: the embedded tower is read, the model is not
    assert len(reads) == 2 and not warm.world.model_loaded
    cold.set_classes("green ring")
    _same(cold.detect(scene(90, 120), conf=0.05), warm.detect(scene(90, 120), conf=0.05))

    assert warm.worker_payload().model is warm.world.model  # what needs the weights has them: the read above served
    assert len(reads) == 2 and warm.world.model_loaded    # the tower and the model alike


def test_a_missing_compiled_model_is_built_from_weights_read_then(checkpoint, reads):
    _, found = _start(checkpoint)
    CompiledCache().clear()
    det, again = _start(checkpoint)
    assert det.world.backend.exports == 1 and det.world.model_loaded and len(reads) == 2
    _same(found, again)


def test_the_torch_backend_and_damaged_facts_read_the_checkpoint(checkpoint, reads):
    _start(checkpoint)
    torch_det, _ = _start(checkpoint, backend="torch")
    assert torch_det.world.model_loaded and len(reads) == 2
    facts = facts_path(checkpoint)
    good = json.loads(facts.read_text())
    for damage in ("{not json", json.dumps({"version": 1, "stride": "32"}), json.dumps({**good, "sha256": 7}),
                   json.dumps({**good, "version": 99})):
        facts.write_text(damage)
        det, _ = _start(checkpoint)
        assert det.world.model_loaded  # read as absent: the checkpoint itself is read, and the facts written again
        assert json.loads(facts.read_text())["stride"] == det.world.stride
    assert len(reads) == 6


def test_a_training_size_warning_is_given_on_every_start(tmp_path, tiny_text_encoder):
    path = tmp_path / "odd.pt"
    torch.save({"model": random_world_model("yolov8n-worldv2.yaml", seed=3), "train_args": {"imgsz": 40000}}, path)
    for _ in range(2):
        with pytest.warns(OVDetWarning, match="imgsz 40000"):
            det = OVDetector(path, device="cpu", backend="openvino", precision="fp32", text_model=tiny_text_encoder)
        assert det.imgsz == 640
    assert not det.world.model_loaded  # the second start came from the facts



PROBE = """
import json, sys
from ovdet.cli import main
code = main()
heavy = sorted(m for m in ("torch", "torchvision", "ultralytics", "transformers") if m in sys.modules)
print("HEAVY " + json.dumps(heavy))
sys.exit(code)
"""


def _cli(*args: str) -> tuple[list[str], list[str]]:
    """`ovdet ARGS...` in a fresh process: the lines it printed, and which heavy libraries it imported."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OVDET_BACKEND": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    return lines, json.loads(next(line for line in lines if line.startswith("HEAVY "))[6:])


def _cli_detect(image, *args: str) -> tuple[list[dict], list[str]]:
    """`ovdet detect IMAGE --json ...` in a fresh process: its detections, and which heavy libraries it imported."""
    lines, heavy = _cli("detect", str(image), "--json", *args)
    return [d for line in lines if line.startswith("{") for d in json.loads(line)["detections"]], heavy


def test_a_warm_cli_detect_on_openvino_imports_no_torch(checkpoint, tmp_path):
    """A second `ovdet detect` (compiled model, facts and embeddings cached by a first start) runs without torch,
    ultralytics or transformers, and finds what that first start and the torch backend found; so does a warm
    `ovdet annotate`."""
    import cv2

    from ovdet.util.device import only_cpu_here

    image = tmp_path / "src" / "scene.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), scene(90, 120))
    _, first = _start(checkpoint, threads=2)  # in this process: exports, compiles, caches facts and embeddings
    printed = [{"class": str(n), "score": round(float(c), 4), "xyxy": [round(float(v), 1) for v in box]}
               for n, c, box in zip(first.data["class_name"], first.confidence, first.xyxy)]
    common = ("--model", str(checkpoint), "--classes", CLASSES, "--conf", "0.05")
    warm, heavy = _cli_detect(image, *common, "--device", "cpu", "--backend", "openvino", "--precision", "fp32",
                              "--threads", "2")
    assert heavy == []
    assert warm == printed  # the same computation (compiled model, image, threads) in another process
    out = tmp_path / "annotated"
    _, heavy = _cli("annotate", str(image.parent), "--out", str(out), *common, "--device", "cpu", "--backend",
                    "openvino", "--precision", "fp32", "--threads", "2")
    assert heavy == []  # a warm folder job needs no torch either
    (line,) = (out / "predictions.jsonl").read_text().splitlines()
    written = json.loads(line)["detections"]  # scores written to 5 decimals, printed to 4
    assert [d["class_name"] for d in written] == [d["class"] for d in printed]
    np.testing.assert_allclose([d["score"] for d in written], [d["score"] for d in printed], rtol=0, atol=1e-4)
    reference = OVDetector(checkpoint, device="cpu", backend="torch")
    reference.set_classes(CLASSES)
    want = reference.detect(scene(90, 120), conf=0.05)
    runs = [warm]
    if only_cpu_here():  # the defaults (device auto, backend auto, threads) know there is no GPU without torch
        default, heavy = _cli_detect(image, *common)
        assert heavy == []
        runs.append(default)
    for found in runs:  # across runtimes (and thread counts), printed rounded to 0.1 px and 4 decimals
        assert len(found) == len(want) > 0 and [d["class"] for d in found] == list(want.data["class_name"])
        np.testing.assert_allclose([d["xyxy"] for d in found], want.xyxy, rtol=0, atol=0.1)
        np.testing.assert_allclose([d["score"] for d in found], want.confidence, rtol=0, atol=2e-4)
