"""Label Studio's ML-backend protocol on `ovdet serve`, with the request shapes Label Studio sends: /setup with the
project's labelling config, /predict with tasks whose images live under --data-root → rectanglelabels in percent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ovdet.detector import OVDetector  # noqa: E402
from ovdet.media.sources import load_image  # noqa: E402
from ovdet.service import ServeSettings, create_app  # noqa: E402
from ovdet.service.labelstudio import parse_label_config  # noqa: E402
from ovdet.service.vocab import VocabularyStore  # noqa: E402

SHAPES = Path(__file__).resolve().parents[1] / "samples" / "shapes.jpg"
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="label" toName="image">
    <Label value="red circle" background="red"/>
    <Label value="blue square" background="blue"/>
  </RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def det():
    return OVDetector("demo", device="cpu", backend="torch")


@pytest.fixture
def media(tmp_path):
    """Label Studio's media folder: uploads land in upload/<project>/<prefix>-<name>."""
    (tmp_path / "media" / "upload" / "1").mkdir(parents=True)
    shutil.copy(SHAPES, tmp_path / "media" / "upload" / "1" / "3f2a-shapes.jpg")
    return tmp_path / "media"


def client_for(det, tmp_path, media, **settings):
    settings = ServeSettings(data_root=media, max_wait_ms=0, model_version="ovdet-demo", **settings)
    return TestClient(create_app(det, settings, vocabularies=VocabularyStore(tmp_path / "v")))


def test_setup_and_predict_give_rectanglelabels_equal_to_the_detector(det, tmp_path, media):
    det.set_classes(["red circle", "blue square"])
    want = det.detect(load_image(SHAPES))
    assert len(want), "the demo model finds shapes in the sample"
    h, w = load_image(SHAPES).shape[:2]
    with client_for(det, tmp_path, media) as client:
        assert client.get("/health").json()["status"] == "UP"
        setup = client.post("/setup", json={"project": "1.1733000000", "schema": CONFIG,
                                            "hostname": "http://localhost:8080", "access_token": "abc",
                                            "model_version": ""})
        assert setup.status_code == 200 and setup.json() == {"model_version": "ovdet-demo"}
        task = {"id": 7, "data": {"image": "/data/upload/1/3f2a-shapes.jpg"}, "meta": {}, "annotations": [],
                "predictions": [], "project": 1}
        body = {"tasks": [task], "model_version": "ovdet-demo", "project": "1.1733000000", "label_config": CONFIG,
                "params": {"login": None, "password": None, "context": None}}
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200, answer.text
        # without label_config, the config /setup stored for the project is used
        again = client.post("/predict", json={k: v for k, v in body.items() if k != "label_config"})
    out = answer.json()
    assert out["model_version"] == "ovdet-demo" and again.json()["results"] == out["results"]
    (prediction,) = out["results"]
    assert prediction["model_version"] == "ovdet-demo"
    results = prediction["result"]
    assert len(results) == len(want)
    for r, box, score, name in zip(results, want.xyxy, want.confidence, want.data["class_name"]):
        assert r["type"] == "rectanglelabels" and r["from_name"] == "label" and r["to_name"] == "image"
        assert (r["original_width"], r["original_height"]) == (w, h)
        v = r["value"]
        assert v["rectanglelabels"] == [name]
        x1, y1, x2, y2 = (float(c) for c in box)
        assert v["x"] == pytest.approx(100 * x1 / w) and v["y"] == pytest.approx(100 * y1 / h)
        assert v["width"] == pytest.approx(100 * (x2 - x1) / w) and v["height"] == pytest.approx(100 * (y2 - y1) / h)
        assert r["score"] == pytest.approx(float(score))
    assert prediction["score"] == pytest.approx(sum(float(s) for s in want.confidence) / len(want))


def test_tasks_outside_the_data_root_or_by_url_get_an_error_each(det, tmp_path, media):
    (tmp_path / "secret.jpg").write_bytes(SHAPES.read_bytes())
    (media / "upload" / "1" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/../../../secret.jpg"}},
             {"id": 2, "data": {"image": str(tmp_path / "secret.jpg")}},
             {"id": 3, "data": {"image": "/data/upload/1/link.jpg"}},
             {"id": 4, "data": {"image": "http://127.0.0.1:9/x.jpg"}},
             {"id": 5, "data": {"image": "/data/local-files/?d=upload/1/3f2a-shapes.jpg"}},
             {"id": 6, "data": {"image": "/data/upload/1/missing.jpg"}},
             {"id": 7, "data": {"text": "no image"}}]
    with client_for(det, tmp_path, media) as client:
        out = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).json()["results"]
    codes = [r.get("error", {}).get("code") for r in out]
    assert codes == ["outside_data_root"] * 3 + ["urls_disabled", None, "image_not_found", "no_image"]
    assert out[4]["result"], "the local-files task inside the root is predicted"
    # Label Studio 1.23 pairs answers with tasks by position, stores a prediction for each answer with a `result`
    # (an empty one reads as "the model found nothing", and the task is never asked for again) and skips answers
    # without one: a task that failed must carry no `result`, so it is retried once its image is readable
    assert [("result" in r) for r in out] == [False] * 4 + [True] + [False] * 2
    assert all(r["model_version"] == "ovdet-demo" for r in out)


def test_predict_takes_all_the_tasks_label_studio_sends_at_once(det, tmp_path, media):
    """"Retrieve predictions" sends every selected task in one /predict, and Label Studio stores nothing when the
    answer is an error: the tasks are not capped at --max-images (images per /v1/detect), only at MAX_TASKS."""
    from ovdet.service.labelstudio import MAX_TASKS

    tasks = [{"id": i, "data": {"image": "/data/upload/1/3f2a-shapes.jpg"}} for i in range(3)]
    with client_for(det, tmp_path, media, max_images=2) as client:
        answer = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert len(results) == 3 and all(r["result"] and r["result"] == results[0]["result"] for r in results)
        too_many = client.post("/predict", json={"tasks": [{"id": i, "data": {}} for i in range(MAX_TASKS + 1)],
                                                 "label_config": CONFIG})
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_tasks"


def test_local_files_storage_reads_under_its_own_root(det, tmp_path, media):
    """Label Studio serves uploads from its media folder and local files storage from LOCAL_FILES_DOCUMENT_ROOT,
    usually another folder: --local-files-root reads the second while --data-root keeps reading the first, and
    neither lets a task out of its own folder."""
    docs = tmp_path / "documents"
    (docs / "photos").mkdir(parents=True)
    shutil.copy(SHAPES, docs / "photos" / "shapes.jpg")
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/3f2a-shapes.jpg"}},
             {"id": 2, "data": {"image": "/data/local-files/?d=photos/shapes.jpg"}},
             {"id": 3, "data": {"image": "/data/local-files/?d=../media/upload/1/3f2a-shapes.jpg"}},
             {"id": 4, "data": {"image": "/data/upload/../../documents/photos/shapes.jpg"}},
             {"id": 5, "data": {"image": "/data/local-files/?d=upload/1/3f2a-shapes.jpg"}}]

    def codes(**roots):
        with client_for(det, tmp_path, media, **roots) as client:
            out = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).json()["results"]
        assert all(bool(r.get("result")) == ("error" not in r) for r in out)
        return [r.get("error", {}).get("code") for r in out]

    assert codes(local_files_root=docs) == [None, None, "outside_data_root", "outside_data_root", "image_not_found"]
    # without it, local files are read under --data-root, as before
    assert codes() == [None, "image_not_found", None, "outside_data_root", None]  # (3 resolves inside media)
    escape = [{"id": 6, "data": {"image": "/data/local-files/?d=../documents/photos/shapes.jpg"}}]
    with client_for(det, tmp_path, media) as client:  # the refusal names the option that sets the folder
        out = client.post("/predict", json={"tasks": escape, "label_config": CONFIG}).json()["results"]
    assert "outside the server's --data-root" in out[0]["error"]["message"]
    with client_for(det, tmp_path, media, local_files_root=docs) as client:
        out = client.post("/predict", json={"tasks": tasks[2:3], "label_config": CONFIG}).json()["results"]
    assert "outside the server's --local-files-root" in out[0]["error"]["message"]
    with client_for(det, tmp_path, None, local_files_root=docs) as client:  # local files only, no uploads
        out = client.post("/predict", json={"tasks": tasks[:2], "label_config": CONFIG}).json()["results"]
    assert [r.get("error", {}).get("code") for r in out] == ["paths_disabled", None]


@pytest.mark.parametrize("xml, code", [
    ("<View><Image name='i' value='$image'/></View>", "no_rectangle_labels"),
    ("<View><RectangleLabels name='l' toName='i'><Label value='a'/></RectangleLabels>", "bad_label_config"),
    ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
     "<View><Image name='i' value='$image'/><RectangleLabels name='l' toName='i'><Label value='&b;'/>"
     "</RectangleLabels></View>", "bad_label_config"),
    ("<View>" + " " * 300_000 + "</View>", "label_config_too_large"),
])
def test_hostile_or_useless_label_configs_are_refused(xml, code):
    from ovdet.service.settings import ServiceError

    with pytest.raises(ServiceError) as refused:
        parse_label_config(xml)
    assert refused.value.code == code and 400 <= refused.value.status < 500


def test_label_config_labels_and_image_key():
    config = parse_label_config(CONFIG.replace("$image", "$photo"))
    assert config.labels == ("red circle", "blue square") and config.data_key == "photo"
    assert (config.from_name, config.to_name) == ("label", "image")


def test_predict_stops_when_label_studio_gives_up(det, tmp_path, media, monkeypatch):
    """Label Studio drops a /predict that outlasts its timeout (100 s) and asks again later: the tasks left are not
    detected for nobody. The client here has gone once the body is read; one task is done, then the request ends
    (499, counted in /metrics)."""
    import json

    calls = []
    real = det.detect_batch
    monkeypatch.setattr(det, "detect_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    tasks = [{"id": i, "data": {"image": "/data/upload/1/3f2a-shapes.jpg"}} for i in range(5)]
    body = json.dumps({"tasks": tasks, "label_config": CONFIG}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 9090)}

    async def gone_after_the_body(app) -> list[dict]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    with client_for(det, tmp_path, media) as client:
        sent = client.portal.call(gone_after_the_body, client.app)
        assert sent[0]["status"] == 499 and b"client_closed" in sent[1]["body"]
        assert len(calls) == 1
        assert 'ovdet_requests_total{route="/predict",status="499"} 1' in client.get("/metrics").text
        calls.clear()
        answer = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})  # a client that waits
        assert answer.status_code == 200 and len(answer.json()["results"]) == 5 and len(calls) == 5
