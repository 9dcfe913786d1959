"""`ovdet serve --ray`: the app as a Ray Serve deployment of 2 replicas on a local Ray instance answers over HTTP what
OVDetector finds in process. Ray Serve comes with the test extra (ovdet[ray]): a missing one fails, it is not skipped."""

from __future__ import annotations

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
# Ray Serve 2.60's own config models use a Pydantic 2 deprecation (not ovdet's to fix)
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

from ovdet.config import DetectorConfig  # noqa: E402
from ovdet.detector import OVDetector  # noqa: E402
from ovdet.service.settings import ServeSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = [(REPO / "samples" / "shapes.jpg", "red circle,blue square"),
         (REPO / "samples" / "shapes" / "shape_3.jpg", "green triangle,blue square")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def service():
    from ovdet.service.rayserve import deploy, import_serve

    ray, serve = import_serve()
    assert not ray.is_initialized()

    def too_slow(*_):
        raise TimeoutError("the deployment did not come up in 240 s")

    # in the main thread: Ray's processes die with the thread that started them (PR_SET_PDEATHSIG), so the bound on
    # the wait is an alarm, not a helper thread
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(240)
    service = None
    try:  # backend left to $OVDET_BACKEND (torch, from conftest): the replicas must see the test's environment
        service = deploy(DetectorConfig(model="demo", device="cpu", conf=0.1), ServeSettings(), port=free_port(),
                         replicas=2, quiet=True)
        signal.alarm(0)
        yield service
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if service is not None:
            service.stop()
        else:
            serve.shutdown()
            ray.shutdown()
        assert not ray.is_initialized()


def test_replicas_run_with_the_callers_ovdet_settings(monkeypatch):
    from ovdet.service.rayserve import replica_env

    monkeypatch.setenv("OVDET_SERVE_TOKEN", "secret")
    env = replica_env()
    assert env["OVDET_HOME"] == os.environ["OVDET_HOME"] and env["OVDET_BACKEND"] == "torch"
    assert "OVDET_SERVE_TOKEN" not in env  # the token travels in the settings


def test_two_replicas_answer_the_detectors_detections(service):
    from ray import serve

    assert service.replicas == 2 and service.started_ray
    states = serve.status().applications["ovdet"].deployments["ovdet"].replica_states
    assert states == {"RUNNING": 2}, states
    det = OVDetector("demo", device="cpu", conf=0.1)
    wants = []
    for path, classes in CASES:
        det.set_classes(classes)
        wants.append(det.detect(str(path)))

    def ask(case: int) -> dict:
        path, classes = CASES[case]
        got = httpx.post(f"{service.url}/v1/detect", data={"classes": classes}, timeout=120,
                         files={"image": (path.name, path.read_bytes(), "image/jpeg")})
        assert got.status_code == 200, got.text
        return got.json()

    with ThreadPoolExecutor(4) as pool:  # concurrent requests, spread over the replicas by Serve's router
        answers = list(pool.map(ask, [0, 1, 0, 1]))
    for i, answer in enumerate(answers):
        want = wants[i % 2]
        assert answer["backend"] == det.backend == "torch"
        rows = answer["images"][0]["detections"]
        assert rows, "the sample should have detections"
        assert [r["class_name"] for r in rows] == list(want.data["class_name"])
        for r, box, score in zip(rows, want.xyxy, want.confidence):
            assert r["xyxy"] == pytest.approx([float(v) for v in box], abs=1e-2)
            assert r["score"] == pytest.approx(float(score), abs=1e-4)
    assert httpx.get(f"{service.url}/", timeout=30).status_code == 200  # the page too

    # a vocabulary stored through one replica is used by both (they share $OVDET_HOME/vocabularies on this machine)
    path, classes = CASES[0]
    assert httpx.put(f"{service.url}/v1/vocabularies/shapes", json={"classes": classes}, timeout=60).status_code == 200
    with ThreadPoolExecutor(4) as pool:
        named = list(pool.map(lambda _: httpx.post(
            f"{service.url}/v1/detect", data={"vocabulary": "shapes"}, timeout=120,
            files={"image": (path.name, path.read_bytes(), "image/jpeg")}), range(8)))
    for got in named:
        assert got.status_code == 200, got.text
        assert [r["class_name"] for r in got.json()["images"][0]["detections"]] == list(wants[0].data["class_name"])


def test_ray_options_are_checked_before_anything_starts(capsys):
    from ovdet.cli import main
    from ovdet.service.rayserve import import_serve

    assert main(["serve", "--model", "demo", "--replicas", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["serve", "--model", "demo", "--ray", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert not import_serve()[0].is_initialized()


def test_vocabulary_stores_on_one_folder_see_each_others_changes(tmp_path):
    from ovdet.service.settings import ServiceError
    from ovdet.service.vocab import VocabularyStore

    one, two = VocabularyStore(tmp_path), VocabularyStore(tmp_path)  # two replicas' stores
    one.put("shapes", "red circle")
    assert two.get("shapes")["classes"] == "red circle" and two.names() == ["shapes"]
    version = two.get("shapes")["version"]
    one.put("shapes", "red circle,blue square")
    again = two.get("shapes")
    assert again["classes"] == "red circle,blue square" and again["version"] != version
    assert two.get("shapes")["version"] == again["version"]  # unchanged file: same version
    two.delete("shapes")
    with pytest.raises(ServiceError) as refused:
        one.get("shapes")
    assert refused.value.status == 404 and one.names() == []
