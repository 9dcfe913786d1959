"""The try-it page at `/` of the real `ovdet serve` process, in headless Debian chromium: an image uploaded through
the file input and classes typed come back as the server's detections, listed in the DOM and drawn on the canvas."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "samples" / "shapes.jpg"
CLASSES = "red circle,blue square"
TOKEN = "t0ken"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
from test_serve_http import free_port, wait_until_up  # noqa: E402

ROW = re.compile(r"^(.+) (\d\.\d{3}) \[(.*)\]$")



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_page")
    port = free_port()
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ovdet.cli", "serve", "--model", "demo", "--device", "cpu",
                             "--backend", "torch", "--port", str(port)],
                            cwd=REPO, env=dict(os.environ, OVDET_SERVE_TOKEN=TOKEN), stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, base, tmp / "server.log")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _chromium(*extra: str):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-background-networking", *extra):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser():
    driver = _chromium()
    yield driver
    driver.quit()


def _wait(browser, script: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not browser.execute_script(script):
        assert time.monotonic() < deadline, f"the page never got to: {script}"
        time.sleep(0.1)


def _dom_rows(browser) -> list[tuple[str, float, list[float]]]:
    texts = browser.execute_script("return [...document.querySelectorAll('#detections li')].map(li => li.textContent)")
    rows = []
    for text in texts:
        m = ROW.match(text)
        assert m, text
        rows.append((m.group(1), float(m.group(2)), [float(v) for v in m.group(3).split(",")]))
    return rows


def test_page_is_self_contained(server):
    got = httpx.get(f"{server}/", timeout=10)  # open without the token: the page holds nothing secret
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/html")
    policy = got.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "trusted-types 'none'" in policy
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", got.text), "the page loads something from the network"


def test_uploaded_image_gets_the_servers_boxes_drawn(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/")
    _wait(browser, "return !!(window.ovdetPage && window.ovdetPage.ready)")
    browser.find_element(By.ID, "classes").send_keys(CLASSES)
    browser.find_element(By.ID, "file").send_keys(str(SHAPES))
    _wait(browser, "return window.ovdetPage.answers >= 1")
    # no token typed yet: the server refuses, the page says why and draws no box
    assert "token" in (browser.execute_script("return window.ovdetPage.error") or "")
    assert _dom_rows(browser) == []

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "detect").click()
    _wait(browser, "return window.ovdetPage.answers >= 2")
    assert browser.execute_script("return window.ovdetPage.error") is None
    floor = browser.execute_script("return window.ovdetPage.floor")
    threshold = float(browser.find_element(By.ID, "threshold").get_attribute("value"))

    # the same request, sent by the test
    answer = httpx.post(f"{server}/v1/detect", data={"classes": CLASSES, "conf": str(floor)},
                        files={"image": ("shapes.jpg", SHAPES.read_bytes(), "image/jpeg")},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120).json()
    rows = answer["images"][0]["detections"]
    want = [r for r in rows if r["score"] >= threshold]
    assert want and len(want) < len(rows), "the sample should have boxes above and below the threshold"
    shown = browser.execute_script("return window.ovdetPage.shown")
    assert [(s["class_name"], s["class_id"]) for s in shown] == [(r["class_name"], r["class_id"]) for r in want]
    for s, r in zip(shown, want):
        assert s["score"] == pytest.approx(r["score"], abs=1e-4)
        assert s["xyxy"] == pytest.approx(r["xyxy"], abs=1e-2)
    dom = _dom_rows(browser)
    assert [name for name, _, _ in dom] == [r["class_name"] for r in want]
    for (_, score, box), r in zip(dom, want):
        assert score == pytest.approx(r["score"], abs=5e-4)
        assert box == pytest.approx(r["xyxy"], abs=1e-2)

    # the canvas: the image at its own size, and each shown box's colour on its left edge, where the photo is not
    size = browser.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height]")
    assert size == list(Image.open(SHAPES).size)
    photo = np.asarray(Image.open(SHAPES).convert("RGB")).astype(int)
    for s in shown:
        x1, y1, x2, y2 = s["xyxy"]
        x, y = int(np.floor(x1)), int(round((y1 + y2) / 2))
        pixel = browser.execute_script(
            "return [...document.getElementById('canvas').getContext('2d').getImageData(arguments[0], arguments[1], "
            "1, 1).data]", x, y)
        colour = [int(s["colour"][i:i + 2], 16) for i in (1, 3, 5)]
        assert np.abs(photo[y, x] - colour).max() > 60, "the photo already has the box colour there"
        assert np.abs(np.array(pixel[:3]) - colour).max() <= 8, (s, pixel)

    # the threshold filters in the page: all of the answer at the floor
    browser.execute_script("const t = document.getElementById('threshold'); t.value = arguments[0]; "
                           "t.dispatchEvent(new Event('input'))", floor)
    assert len(_dom_rows(browser)) == len(rows)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert errors == []


def test_camera_frames_are_sent_until_it_stops(server):
    from selenium.webdriver.common.by import By

    # Chromium's fake camera (a moving test pattern), allowed without a prompt
    browser = _chromium("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    try:
        browser.get(f"{server}/")
        _wait(browser, "return !!(window.ovdetPage && window.ovdetPage.ready)")
        browser.find_element(By.ID, "classes").send_keys(CLASSES)
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "camera").click()
        _wait(browser, "return window.ovdetPage.answers >= 2")  # the live loop: frame after frame
        assert browser.execute_script("return window.ovdetPage.error") is None
        video = browser.execute_script("const v = document.getElementById('video'); "
                                       "return [v.videoWidth, v.videoHeight]")
        canvas = browser.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height]")
        assert video[0] > 0 and canvas == video
        browser.find_element(By.ID, "camera").click()
        _wait(browser, "return !window.ovdetPage.busy")
        time.sleep(0.5)
        stopped = browser.execute_script("return window.ovdetPage.answers")
        time.sleep(1.5)
        assert browser.execute_script("return window.ovdetPage.answers") == stopped
    finally:
        browser.quit()
