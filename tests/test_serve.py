"""`ovdet serve` in process (FastAPI's TestClient, the demo model on torch): detections equal OVDetector's, stored
vocabularies, limits and hostile inputs answered with 4xx JSON, auth, the bounded queue, cross-request batching,
metrics, and the CLI's refusal to serve a public address without a token."""

from __future__ import annotations

import base64
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ovdet.cli import main  # noqa: E402
from ovdet.detector import OVDetector  # noqa: E402
from ovdet.media.sources import load_image  # noqa: E402
from ovdet.service import ServeSettings, create_app  # noqa: E402
from ovdet.service.vocab import VocabularyStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "samples" / "shapes.jpg"
BUS = REPO / "samples" / "bus.jpg"
CLASSES = "red circle,blue square"


@pytest.fixture(scope="module")
def det():
    return OVDetector("demo", device="cpu", backend="torch")


def reference(det, path, classes=CLASSES, **kwargs):
    """What OVDetector itself finds (called while no server worker runs)."""
    det.set_classes(classes)
    d = det.detect(load_image(path), **kwargs)
    return [{"class_name": str(n), "class_id": int(c), "score": round(float(s), 5),
             "xyxy": [round(float(v), 2) for v in box]}
            for n, c, s, box in zip(d.data["class_name"], d.class_id, d.confidence, d.xyxy)]


def client_for(det, tmp_path, **settings):
    settings.setdefault("max_wait_ms", 0)
    store = VocabularyStore(tmp_path / "vocabularies")
    return TestClient(create_app(det, ServeSettings(**settings), vocabularies=store))


def upload(*paths):
    return [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code, response.json()
    assert response.json()["error"]["message"]


def png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header claims width × height pixels (its pixel data is a few zero rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_detect_answers_what_the_detector_finds(det, tmp_path):
    want = reference(det, SHAPES, conf=0.1)
    assert want, "the demo model finds shapes in the sample"
    with client_for(det, tmp_path) as client:
        got = client.post("/v1/detect", data={"classes": CLASSES, "conf": "0.1"}, files=upload(SHAPES))
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["images"][0]["detections"] == want
        h, w = load_image(SHAPES).shape[:2]
        assert (body["images"][0]["width"], body["images"][0]["height"]) == (w, h)
        assert body["backend"] == "torch" and body["classes"] == ["red circle", "blue square"]
        assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms"}
        as_json = client.post("/v1/detect", json={"classes": CLASSES, "conf": 0.1,
                                                  "images": [base64.b64encode(SHAPES.read_bytes()).decode()]})
        assert as_json.json()["images"][0]["detections"] == want
        assert client.get("/health").json()["status"] == "UP"
        assert "/v1/detect" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
        metrics = client.get("/metrics").text
    assert 'ovdet_requests_total{route="/v1/detect",status="200"} 2' in metrics
    assert "ovdet_batch_images_count 2" in metrics and "ovdet_queue_depth 0" in metrics
    assert 'ovdet_request_seconds_bucket{le="+Inf"}' in metrics


def test_vocabularies_round_trip_and_persist(det, tmp_path):
    want = reference(det, SHAPES, conf=0.1)
    with client_for(det, tmp_path) as client:
        put = client.put("/v1/vocabularies/shapes", json={"classes": CLASSES})
        assert put.status_code == 200 and put.json()["classes"] == ["red circle", "blue square"]
        assert client.get("/v1/vocabularies/shapes").json()["classes"] == CLASSES
        got = client.post("/v1/detect", data={"vocabulary": "shapes", "conf": "0.1"}, files=upload(SHAPES))
        assert got.json()["images"][0]["detections"] == want
        assert VocabularyStore(tmp_path / "vocabularies").get("shapes")["classes"] == CLASSES  # kept on disk
        for bad in (".hidden", "a b", "x" * 65, "..x", "%2E%2E"):
            assert_error(client.put(f"/v1/vocabularies/{bad}", json={"classes": "a"}), 400, "bad_vocabulary_name")
        for bad in ("..", "a%2F..%2F..%2Fb", "..%2F..%2Fescaped"):  # a separator never reaches a file name
            assert 400 <= client.put(f"/v1/vocabularies/{bad}", json={"classes": "a"}).status_code < 500
        assert not list(tmp_path.glob("**/escaped*")) and not list(tmp_path.glob("**/b.json"))
        assert sorted(p.name for p in (tmp_path / "vocabularies").iterdir()) == ["shapes.json"]
        assert_error(client.put("/v1/vocabularies/empty", json={"classes": ""}), 400, "bad_classes")
        assert client.delete("/v1/vocabularies/shapes").json()["deleted"] is True
        assert_error(client.get("/v1/vocabularies/shapes"), 404, "unknown_vocabulary")
        assert not (tmp_path / "vocabularies" / "shapes.json").exists()


def test_bad_inputs_get_4xx_json_and_the_next_request_succeeds(det, tmp_path):
    truncated = BUS.read_bytes()[: BUS.stat().st_size // 2]
    with client_for(det, tmp_path, max_body_bytes=2 << 20, max_images=2) as client:
        def post(files=(), **data):
            return client.post("/v1/detect", data={"classes": CLASSES, **data}, files=list(files))
        assert_error(post([("image", ("x.jpg", b"garbage bytes", "image/jpeg"))]), 400, "bad_image")
        assert "truncated" in post([("image", ("t.jpg", truncated, "image/jpeg"))]).json()["error"]["message"]
        assert_error(post([("image", ("big.png", png_header(30000, 30000), "image/png"))]), 413, "too_many_pixels")
        many = ",".join(f"thing {i}" for i in range(10_000))
        assert_error(post(upload(SHAPES), classes=many), 400, "too_many_classes")
        assert_error(post(upload(SHAPES), conf="2"), 400, "bad_conf")
        assert_error(post(upload(SHAPES, SHAPES, SHAPES)), 413, "too_many_images")
        assert_error(post(), 400, "no_images")
        assert_error(post([("image", ("huge.jpg", b"\0" * (3 << 20), "image/jpeg"))]), 413, "body_too_large")
        assert_error(client.post("/v1/detect", content=b"{not json", headers={"content-type": "application/json"}),
                     400, "invalid_json")
        assert_error(client.post("/v1/detect", json={"classes": CLASSES, "urls": ["http://127.0.0.1:9/x.jpg"]}),
                     400, "urls_disabled")
        assert_error(client.post("/v1/detect", json={"classes": CLASSES, "images": ["@@@"]}), 400, "bad_base64")
        named = client.post("/v1/detect", json={"classes": "/etc/passwd.yaml",
                                                "images": [base64.b64encode(SHAPES.read_bytes()).decode()]})
        assert named.json()["classes"] == ["/etc/passwd.yaml"]  # a class-file name is a class name, never a file read
        exemplar = {"classes": [{"name": "a", "exemplars": [{"image": "/etc/hostname", "box": [0, 0, 1, 1]}]}]}
        assert_error(client.post("/v1/detect", json={"classes": exemplar, "images": ["AA=="]}), 400,
                     "exemplars_unsupported")
        assert post(upload(SHAPES)).status_code == 200


def test_urls_are_fetched_only_when_allowed(det, tmp_path):
    import functools
    import http.server

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "shapes.jpg").write_bytes(SHAPES.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shapes.jpg"
    try:
        want = reference(det, SHAPES, conf=0.1)
        with client_for(det, tmp_path, allow_urls=True) as client:
            got = client.post("/v1/detect", json={"classes": CLASSES, "conf": 0.1, "urls": [url]})
            assert got.status_code == 200, got.text
            assert got.json()["images"][0]["detections"] == want
            assert_error(client.post("/v1/detect", json={"classes": CLASSES, "urls": [url + ".missing"]}), 400,
                         "fetch_failed")
            assert_error(client.post("/v1/detect", json={"classes": CLASSES, "urls": ["ftp://127.0.0.1/x.jpg"]}),
                         400, "bad_image_ref")
    finally:
        server.shutdown()


def test_token_is_required_when_set(det, tmp_path):
    with client_for(det, tmp_path, token="s3cret") as client:
        assert_error(client.post("/v1/detect", data={"classes": CLASSES}, files=upload(SHAPES)), 401, "unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(client.get("/v1/vocabularies/x", headers=wrong), 401, "unauthorized")
        assert client.get("/health").status_code == 200  # health stays open for probes
        ok = client.post("/v1/detect", data={"classes": CLASSES}, files=upload(SHAPES),
                         headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        basic = base64.b64encode(b"labelstudio:s3cret").decode()
        assert client.get("/metrics", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_concurrent_requests_with_one_vocabulary_share_one_forward_pass(det, tmp_path, monkeypatch):
    alone = reference(det, SHAPES, conf=0.1), reference(det, BUS, conf=0.1)
    calls = []
    real = det.detect_batch

    def counting(images, **kwargs):
        calls.append(len(images))
        return real(images, **kwargs)

    monkeypatch.setattr(det, "detect_batch", counting)
    with client_for(det, tmp_path, max_batch=2, max_wait_ms=5000) as client:
        answers = {}

        def ask(path):
            answers[path] = client.post("/v1/detect", data={"classes": CLASSES, "conf": "0.1"}, files=upload(path))

        threads = [threading.Thread(target=ask, args=(p,)) for p in (SHAPES, BUS)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert calls == [2], "two requests with one vocabulary: one detect_batch call of two images"
        assert answers[SHAPES].json()["images"][0]["detections"] == alone[0]
        assert answers[BUS].json()["images"][0]["detections"] == alone[1]
        assert answers[BUS].json()["batch"] == {"images": 2, "requests": 2}
        calls.clear()
        threads = [threading.Thread(target=client.post, args=("/v1/detect",),
                                    kwargs={"data": {"classes": c}, "files": upload(SHAPES)})
                   for c in (CLASSES, "green triangle")]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert calls == [1, 1], "other vocabularies run in their own passes"


def test_full_queue_answers_503_with_retry_after():
    from ovdet.service.batcher import Batcher, Job
    from ovdet.service.settings import ServiceError

    release = threading.Event()

    class Slow:
        def set_classes(self, spec):
            pass

        def detect_batch(self, images, **kwargs):
            release.wait(30)
            return [np.zeros(0)] * len(images)

    batcher = Batcher(Slow(), max_batch=1, max_wait_ms=0, max_queue=1)
    first = batcher.submit(Job("k", None, [1], {}))
    for _ in range(200):  # the worker takes the first job; the second waits in the queue
        if batcher.depth() == 0:
            break
        threading.Event().wait(0.01)
    second = batcher.submit(Job("k", None, [2], {}))
    with pytest.raises(ServiceError) as refused:
        batcher.submit(Job("k", None, [3], {}))
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
    release.set()
    batcher.close()
    assert len(first.result(5).detections) == 1 and len(second.result(5).detections) == 1  # queued work finished


def test_serve_refuses_a_public_address_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv("OVDET_SERVE_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--model", "demo"]) != 0
    assert "without a token" in capsys.readouterr().err
