"""The real `ovdet serve` process (uvicorn on a loopback port) answers over HTTP what OVDetector finds in process,
refuses a missing token, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ovdet.detector import OVDetector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "samples" / "shapes.jpg"
CLASSES = "red circle,blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, base: str, log: Path, seconds: float = 240) -> None:
    """Wait until the server started as `proc` answers GET /health; fails with its log if it exits first."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.5)


def test_served_detections_equal_the_detector(tmp_path):
    port = free_port()
    env = dict(os.environ, OVDET_SERVE_TOKEN="t0ken")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ovdet.cli", "serve", "--model", "demo", "--device", "cpu",
                             "--backend", "torch", "--port", str(port), "--conf", "0.1"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        det = OVDetector("demo", device="cpu", backend="torch", conf=0.1)
        det.set_classes(CLASSES)
        want = det.detect(str(SHAPES))
        base = f"http://127.0.0.1:{port}"
        wait_until_up(proc, base, tmp_path / "server.log")
        files = {"image": ("shapes.jpg", SHAPES.read_bytes(), "image/jpeg")}
        refused = httpx.post(f"{base}/v1/detect", data={"classes": CLASSES}, files=files, timeout=120)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        got = httpx.post(f"{base}/v1/detect", data={"classes": CLASSES}, files=files, timeout=120,
                         headers={"Authorization": "Bearer t0ken"})
        assert got.status_code == 200, got.text
        rows = got.json()["images"][0]["detections"]
        assert [r["class_name"] for r in rows] == list(want.data["class_name"])
        for r, box, score in zip(rows, want.xyxy, want.confidence):
            assert r["xyxy"] == pytest.approx([float(v) for v in box], abs=0.01)
            assert r["score"] == pytest.approx(float(score), abs=1e-5)
        proc.send_signal(signal.SIGTERM)
        # graceful shutdown: uvicorn finishes the requests and the lifespan (the worker stops), then re-raises the
        # signal it caught, so the exit status is 0 or -SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log.flush()
        assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
