"""The HTML report of a run with masks: each detection's outline in the page data, filled under its box in a real
browser (Debian chromium via selenium, as tests/test_report.py), and an eval run's mask mAP in its eval stats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovdet.cli import main
from ovdet.jobs.synth import WorldSpec, generate
from ovdet.masks import rle
from ovdet.report import write_report
from ovdet.weights.registry import DEMO_FILE

from test_report import _data, _open, browser  # noqa: F401  (the browser fixture)

REPO = Path(__file__).resolve().parents[1]
CLASSES = "red circle,blue square,green triangle"
HOSTILE = "</script><script>alert(1)</script>"


@pytest.fixture(scope="module")
def masks_run(tmp_path_factory) -> Path:
    if not DEMO_FILE.is_file():
        pytest.skip(f"demo model {DEMO_FILE} is absent")
    out = tmp_path_factory.mktemp("report") / "run"
    assert main(["annotate", str(REPO / "samples" / "shapes"), "--model", "demo", "--classes", CLASSES,
                 "--masks", "grabcut", "--out", str(out), "--conf", "0.1", "--device", "cpu", "--backend", "torch",
                 "--report", "--quiet"]) == 0
    return out


def _journal(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_page_data_carries_each_detections_mask_outline(masks_run):
    data = _data(masks_run / "report.html")
    records = {r["key"]: r for r in _journal(masks_run)}
    n = 0
    for im in data["images"]:
        dets = records[im["k"]]["detections"]
        assert len(im["p"]) == len(im["d"]) == len(dets)
        for outline, d in zip(im["p"], dets):
            want = rle.decode(d["segmentation"])
            points = np.array(outline).reshape(-1, 2)
            drawn = rle.polygon_mask(points, im["h"], im["w"])
            frame = np.ascontiguousarray(np.pad(want, 1), np.uint8)
            cv2.floodFill(frame, None, (0, 0), 2, flags=4)
            assert (drawn == (frame[1:-1, 1:-1] != 2)).all()  # the outline redraws the mask, holes filled
            x, y, w, h = rle.to_bbox(d["segmentation"])
            assert points.min(axis=0).tolist() == [x, y] and points.max(axis=0).tolist() == [x + w, y + h]
            n += 1
    assert n >= 4


def test_a_run_without_masks_has_no_outlines_and_hostile_names_stay_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((20, 30, 3), np.uint8))
    mask = np.zeros((20, 30), bool)
    mask[5:10, 4:12] = True
    det = {"class_id": 0, "class_name": HOSTILE, "score": 0.9, "bbox": [4, 5, 12, 10]}
    for name, seg in (("plain", None), ("masked", rle.encode(mask))):
        run = tmp_path / name
        run.mkdir()
        settings = {"source": str(src), "model": "fake", "conf": 0.2, "formats": ["jsonl"], "masks": seg and "x",
                    "classes": {"classes": [{"name": HOSTILE, "prompts": [HOSTILE], "conf": None}], "negatives": [],
                                "templates": [], "reduce": "max"}}
        (run / "run.json").write_text(json.dumps({"version": 1, "settings": settings}))
        line = {"image": "a.png", "path": str(src / "a.png"), "key": "a", "width": 30, "height": 20,
                "detections": [det if seg is None else {**det, "segmentation": seg}]}
        (run / "predictions.jsonl").write_text(json.dumps(line) + "\n")
        page = write_report(run).read_text(encoding="utf-8")
        assert HOSTILE not in page  # the name is in the page only escaped
        im = _data(run / "report.html")["images"][0]
        if seg is None:
            assert "p" not in im
        else:
            assert (rle.polygon_mask(np.array(im["p"][0]).reshape(-1, 2), 20, 30) == mask).all()


def _inside(mask: np.ndarray) -> tuple[int, int]:
    """The mask pixel farthest from its edge (x, y)."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def test_browser_fills_the_masks_under_the_boxes(browser, masks_run):  # noqa: F811
    from selenium.webdriver.common.by import By

    records = _journal(masks_run)
    _open(browser, masks_run / "report.html")
    shown = sum(d["score"] > 0.1 for r in records for d in r["detections"])
    assert browser.execute_script("return document.querySelectorAll('#gallery path.mask').length") == shown > 0
    # open the first card's image: a pixel inside its first mask takes the class colour once the masks are drawn
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    record = records[int(card.get_attribute("data-index"))]
    card.click()
    full = browser.find_element(By.CSS_SELECTOR, "#viewer-stage img")
    browser.execute_script("arguments[0].scrollIntoView()", full)
    x, y = _inside(rle.decode(record["detections"][0]["segmentation"]))
    rect = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width];",
                                  full)
    css = rect[2] / record["width"]  # CSS px per image pixel
    dpr = browser.execute_script("return window.devicePixelRatio")
    px = (int((rect[0] + (x + 0.5) * css) * dpr), int((rect[1] + (y + 0.5) * css) * dpr))

    def pixel() -> np.ndarray:
        shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")).astype(int)
        return shot[px[1], px[0]]

    with_masks = pixel()
    browser.execute_script("document.querySelectorAll('#viewer-stage path.mask').forEach((p) => p.remove())")
    without = pixel()
    color = browser.execute_script("return document.querySelector('#viewer-stage rect.det').getAttribute('stroke')")
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    assert np.abs(with_masks - (0.6 * without + 0.4 * rgb)).max() <= 6  # 40 % of the class colour over the image
    assert np.abs(with_masks - without).max() >= 10
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # no CSP violation


@pytest.fixture(scope="module")
def masks_eval_run(tmp_path_factory) -> Path:
    if not DEMO_FILE.is_file():
        pytest.skip(f"demo model {DEMO_FILE} is absent")
    root = tmp_path_factory.mktemp("eval")
    data = generate(root / "world", train=1, val=4, seed=5, spec=WorldSpec(imgsz=160), progress=False, masks=True)
    out = root / "run"
    assert main(["eval", str(data), "--model", "demo", "--device", "cpu", "--backend", "torch", "--classes", CLASSES,
                 "--masks", "grabcut", "--out", str(out), "--report", "--json"]) == 0
    return out


def test_eval_report_shows_mask_map(browser, masks_eval_run):  # noqa: F811
    from selenium.webdriver.common.by import By

    result = _data(masks_eval_run / "report.html")["eval"]["result"]
    assert 0.0 < result["mask_map50"] <= 1.0
    _open(browser, masks_eval_run / "report.html")
    summary = browser.find_element(By.ID, "eval-summary").text
    assert f"mask mAP50 {result['mask_map50']:.3f}" in summary
    assert f"mask mAP50-95 {result['mask_map50_95']:.3f}" in summary
    head = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#ap-table tr:first-child th")]
    assert head[-2:] == ["mask AP50", "mask AP50-95"]
    assert browser.execute_script("return document.querySelectorAll('#gallery path.mask').length") > 0
