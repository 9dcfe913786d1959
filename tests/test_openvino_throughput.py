"""OpenVINO's throughput mode: batches of 2+ run on a THROUGHPUT compilation with one request per stream in flight,
and give the LATENCY path's detections in the batch's order; single images keep LATENCY; the hint and the thread
budget read back from the compiled models are the ones asked, also when the blob cache serves them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_embeddings, scene
from ovdet import OVDetector
from ovdet.backends import openvino_backend

pytest.importorskip("openvino")
THREADS = 2
SIZES = [(120, 200), (240, 160), (96, 96), (200, 120), (150, 150)]  # mixed sizes: letterboxed to one batch shape


def _detector(ckpt, text) -> OVDetector:
    det = OVDetector(ckpt, text_model=text, device="cpu", imgsz=160, backend="openvino", precision="fp32",
                     threads=THREADS, conf=0.05)
    det.set_embeddings([f"c{i}" for i in range(7)], random_embeddings(7, seed=3))
    return det


@pytest.fixture
def ov_detector(tiny_world_checkpoint, tiny_text_encoder):
    det = _detector(tiny_world_checkpoint, tiny_text_encoder)
    if det.world.backend.compiled_property("NUM_STREAMS", throughput=True) < 2:
        pytest.skip("OpenVINO's THROUGHPUT hint picked one stream on this machine: nothing runs in flight")
    return det


@pytest.fixture
def in_flight_calls(monkeypatch):
    """Counts the batches that went through the in-flight requests."""
    calls = []
    real = openvino_backend._in_flight
    monkeypatch.setattr(openvino_backend, "_in_flight", lambda *a: calls.append(len(a[1])) or real(*a))
    return calls


def _head(backend, batch: torch.Tensor, txt: torch.Tensor, throughput: bool) -> torch.Tensor:
    backend.throughput = throughput
    try:
        return backend.run(batch, txt)
    finally:
        backend.throughput = True


def _assert_head_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, :4].numpy(), want[:, :4].numpy(), rtol=0, atol=1e-2)  # box pixels
    np.testing.assert_allclose(got[:, 4:].numpy(), want[:, 4:].numpy(), rtol=0, atol=1e-4)  # scores


def test_a_mixed_size_batch_gives_the_latency_paths_detections_in_order(ov_detector, in_flight_calls):
    images = [scene(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    backend = ov_detector.world.backend
    backend.throughput = False
    want = ov_detector.detect_batch(images)
    assert in_flight_calls == []
    backend.throughput = True
    got = ov_detector.detect_batch(images)
    assert in_flight_calls == [len(images)]  # the batch went through the streams, in one call
    assert sum(len(d) for d in want) > 0 and len({len(d) for d in want}) > 1  # images that differ, so order shows
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.class_id, w.class_id)
        np.testing.assert_allclose(g.xyxy, w.xyxy, rtol=0, atol=1e-2)
        np.testing.assert_allclose(g.confidence, w.confidence, rtol=0, atol=1e-4)
    # the raw head output too, row for row (every anchor, not only the boxes NMS keeps)
    batch = ov_detector.world.preprocess(images, 160)
    txt = ov_detector.world._txt_feats
    _assert_head_close(_head(backend, batch, txt, True), _head(backend, batch, txt, False))


def test_per_image_text_embeddings_follow_their_image(ov_detector, in_flight_calls):
    images = [scene(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES[:3])]
    backend = ov_detector.world.backend
    batch = ov_detector.world.preprocess(images, 160)
    txt = torch.stack([random_embeddings(7, seed=20 + i) for i in range(len(images))])  # [B, K, D]: one per image
    want = _head(backend, batch, txt, False)
    got = _head(backend, batch, txt, True)
    assert in_flight_calls == [len(images)]
    _assert_head_close(got, want)
    assert not torch.allclose(want[0, 4:], _head(backend, batch[:1], txt[1:2], False)[0, 4:], atol=1e-3)


def test_single_images_keep_the_latency_compilation(ov_detector, in_flight_calls):
    ov_detector.detect(scene(120, 200, seed=0))
    ov_detector.detect_batch([scene(96, 96, seed=1)])
    assert in_flight_calls == []


def test_the_hints_and_thread_budget_read_back_as_asked_also_from_the_blob_cache(tiny_world_checkpoint,
                                                                                 tiny_text_encoder):
    first = _detector(tiny_world_checkpoint, tiny_text_encoder).world.backend
    second = _detector(tiny_world_checkpoint, tiny_text_encoder).world.backend  # same OVDET_HOME: blob cache
    for backend in (first, second):
        assert backend.compiled_property("PERFORMANCE_HINT") == "LATENCY"
        assert backend.compiled_property("NUM_STREAMS") == 1
        assert backend.compiled_property("PERFORMANCE_HINT", throughput=True) == "THROUGHPUT"
        assert backend.compiled_property("INFERENCE_PRECISION_HINT", throughput=True) == "f32"
        for mode in (False, True):  # every stream together within the threads asked for
            assert backend.compiled_property("INFERENCE_NUM_THREADS", throughput=mode) == THREADS
        assert 1 <= backend.compiled_property("NUM_STREAMS", throughput=True) <= THREADS
    # one blob serves both hints (OpenVINO does not key it by the hint), and the hint still applies when it loads
    assert second.compiled_property("LOADED_FROM_CACHE") is True
    assert second.compiled_property("LOADED_FROM_CACHE", throughput=True) is True
    assert len(list((second.build_info.path / openvino_backend.BLOBS).glob("*.blob"))) == 1
