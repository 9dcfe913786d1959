"""`ovdet report`: the page's data and files, and a real browser (Debian chromium via selenium) drawing it offline."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.errors import DatasetError
from ovdet.report import write_report
from ovdet.report.evalstats import match_image
from ovdet.jobs.synth import WorldSpec, generate
from ovdet.weights.registry import DEMO_FILE

REPO = Path(__file__).resolve().parents[1]
CLASSES = "red circle,blue square,green triangle"
RUN_CONF = 0.1
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

needs_demo = pytest.mark.skipif(not DEMO_FILE.is_file(), reason=f"demo model {DEMO_FILE} is absent")


def _journal(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def _above(records: list[dict], thresholds: dict[str, float]) -> int:
    return sum(d["score"] > thresholds[d["class_name"]] for r in records for d in r["detections"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    if not DEMO_FILE.is_file():
        pytest.skip(f"demo model {DEMO_FILE} is absent")
    out = tmp_path_factory.mktemp("report") / "run"
    assert main(["annotate", str(REPO / "samples" / "shapes"), "--model", "demo", "--classes", CLASSES,
                 "--out", str(out), "--conf", str(RUN_CONF), "--device", "cpu", "--report", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    if not DEMO_FILE.is_file():
        pytest.skip(f"demo model {DEMO_FILE} is absent")
    root = tmp_path_factory.mktemp("eval")
    data = generate(root / "world", train=1, val=6, seed=5, spec=WorldSpec(imgsz=160), progress=False)
    out = root / "run"
    assert main(["eval", str(data), "--model", "demo", "--device", "cpu", "--classes", CLASSES,
                 "--out", str(out), "--report", "--json"]) == 0
    return out


def _data(report: Path) -> dict:
    text = report.read_text(encoding="utf-8")
    start = text.index('<script id="ovdet-data" type="application/json">') + len(
        '<script id="ovdet-data" type="application/json">')
    return json.loads(text[start:text.index("</script>", start)])


# ----------------------------------------------------------------------------- the page's data and files


def test_report_embeds_every_detection_and_links_files_relatively(demo_run):
    report = demo_run / "report.html"
    data = _data(report)
    records = _journal(demo_run)
    assert [c["name"] for c in data["classes"]] == CLASSES.split(",")
    assert all(c["floor"] == RUN_CONF == c["start"] for c in data["classes"])
    assert [im["k"] for im in data["images"]] == [r["key"] for r in records]
    assert [[d[:2] for d in im["d"]] for im in data["images"]] == [
        [[d["class_id"], d["score"]] for d in r["detections"]] for r in records]
    for im in data["images"]:
        assert not im["t"].startswith(("/", "file:", "http")) and (demo_run / im["t"]).is_file()
        assert (demo_run / im["f"]).resolve() == (REPO / "samples" / "shapes" / im["n"]).resolve()
        with Image.open(demo_run / im["t"]) as thumb:
            assert max(thumb.size) <= 320
    html = report.read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html and "@import" not in html and "url(" not in html


def test_thumbnails_are_written_once_and_the_run_must_exist(demo_run, tmp_path):
    thumb = next((demo_run / "thumbs").iterdir())
    os.utime(thumb, ns=(10**9, 10**9))  # a stamp that any rewrite replaces (with the time of writing)
    inode = thumb.stat().st_ino
    write_report(demo_run, quiet=True)
    assert thumb.stat().st_mtime_ns == 10**9 and thumb.stat().st_ino == inode
    with pytest.raises(DatasetError, match="not an ovdet run folder"):
        write_report(tmp_path, quiet=True)
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_names_cannot_break_out_of_the_page_and_unreadable_images_are_listed(tmp_path):
    name = "</script><script>alert(1)</script> & <b>"
    run = tmp_path / "run"
    run.mkdir()
    settings = {"classes": {"classes": [{"name": name, "prompts": [name], "conf": None}]}, "conf": 0.2,
                "model": "m"}
    (run / "run.json").write_text(json.dumps({"version": 1, "settings": settings}))
    rec = {"image": "a#b?.jpg", "path": str(tmp_path / "a#b?.jpg"), "key": "a", "width": 10, "height": 10,
           "detections": [{"class_id": 0, "class_name": name, "score": 0.5, "bbox": [1, 1, 5, 5]}]}
    (run / "predictions.jsonl").write_text(json.dumps(rec) + "\n")
    html = write_report(run, quiet=True).read_text(encoding="utf-8")
    assert html.count("</script>") == 2  # the data block's and the script's own closing tags only
    data = _data(run / "report.html")
    assert data["classes"][0]["name"] == name
    assert data["images"][0]["f"] == "../a%23b%3F.jpg" and data["images"][0]["t"] is None
    assert "a" in data["thumb_errors"]  # the image is missing: listed, no thumbnail, the report still written


def test_match_image_is_coco_greedy_and_threshold_independent():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30]], float)
    matched, gt_score = match_image(boxes, np.array([0, 0, 1]), np.array([0.6, 0.9, 0.7]),
                                    np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0]))
    assert matched.tolist() == [False, True, False]  # the best-scoring box takes the object; class 1 matches none
    assert gt_score.tolist() == [0.9, -1.0]


@needs_demo
def test_eval_run_saves_ground_truth_and_report_has_eval_data(eval_run):
    manifest = json.loads((eval_run / "run.json").read_text())
    assert manifest["kind"] == "eval" and manifest["result"]["map50"] > 0.5
    records = _journal(eval_run)
    assert all("gt" in r for r in records) and sum(len(r["gt"]) for r in records) > 0
    data = _data(eval_run / "report.html")
    assert [c["start"] for c in data["classes"]] == [0.25] * 3  # eval keeps boxes from 0.001, shows from 0.25
    assert len(data["eval"]["confusion"]) == 4 and len(data["eval"]["pr"]) == 3
    assert data["eval"]["gt_counts"] == [sum(g["class_id"] == c for r in records for g in r["gt"]) for c in range(3)]
    assert main(["eval", "x.yaml", "--report"]) == 2  # --report without --out


# ----------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver  # the test extra: a missing selenium is a broken install, not a skip
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-background-networking"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _open(browser, report: Path) -> None:
    browser.get_log("performance")  # drop earlier entries
    browser.get_log("browser")
    browser.get(report.resolve().as_uri())
    deadline = time.time() + 20
    while not browser.execute_script("return !!(window.ovdetReport && window.ovdetReport.ready)"):
        assert time.time() < deadline, "the report never became ready"
        time.sleep(0.05)
    # let lazy thumbnails load (every gallery image in view has finished), then check nothing but local files was
    # requested
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    while not browser.execute_script(_THUMBS_IN_VIEW_LOADED):
        assert time.time() < deadline, "the thumbnails in view never finished loading"
        time.sleep(0.05)


_THUMBS_IN_VIEW_LOADED = """
const shown = Array.from(document.querySelectorAll('#gallery img')).filter(img => {
  const box = img.getBoundingClientRect();
  return box.bottom > 0 && box.top < window.innerHeight;
});
return shown.length > 0 && shown.every(img => img.complete);
"""


def _requests(browser) -> list[str]:
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _drawn(browser) -> int:
    return browser.execute_script("return document.querySelectorAll('#gallery rect.det').length")


def _wait_render(browser, before: int) -> None:
    deadline = time.time() + 10
    while browser.execute_script("return window.ovdetReport.renders") <= before:
        assert time.time() < deadline, "the page did not redraw"
        time.sleep(0.02)


def test_browser_draws_the_boxes_above_the_sliders_offline(browser, demo_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    records = _journal(demo_run)
    names = CLASSES.split(",")
    _open(browser, demo_run / "report.html")
    thresholds = {n: RUN_CONF for n in names}
    assert _drawn(browser) == _above(records, thresholds) > 0

    # Move the slider of the class with the most boxes up past some of its scores, with the keyboard.
    counts = {n: sum(d["class_name"] == n for r in records for d in r["detections"]) for n in names}
    name = max(names, key=counts.get)
    scores = sorted(d["score"] for r in records for d in r["detections"] if d["class_name"] == name)
    target = scores[len(scores) // 2]  # half its boxes at or under the new threshold
    slider = browser.find_element(By.ID, f"thr-{names.index(name)}")
    for _ in range(int(np.ceil((target - RUN_CONF) / 0.01 + 1e-9))):
        before = browser.execute_script("return window.ovdetReport.renders")
        slider.send_keys(Keys.ARROW_RIGHT)
        _wait_render(browser, before)
    thresholds[name] = float(slider.get_attribute("value"))
    assert thresholds[name] >= target
    assert _drawn(browser) == _above(records, thresholds) < _above(records, {n: RUN_CONF for n in names})
    kept_cell = browser.find_element(By.CSS_SELECTOR, f'tr[data-class="{names.index(name)}"] td:nth-child(4)')
    assert int(kept_cell.get_attribute("data-kept")) == sum(s > thresholds[name] for s in scores)

    # "Copy thresholds" gives the relabel command that keeps exactly the boxes on screen.
    browser.find_element(By.ID, "copy").click()
    command = browser.find_element(By.ID, "relabel-cmd").text
    argv = shlex.split(command)
    assert argv[:3] == ["ovdet", "relabel", str(demo_run.resolve())]
    argv[argv.index("--out") + 1] = str(tmp_path / "relabelled")
    assert main(argv[1:] + ["--quiet"]) == 0
    assert sum(len(r["detections"]) for r in _journal(tmp_path / "relabelled")) == _drawn(browser)

    # Click a card: the full image opens with the same boxes.
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    n_card = len(card.find_elements(By.CSS_SELECTOR, "rect.det"))
    card.click()
    assert browser.find_element(By.ID, "viewer").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#viewer-stage rect.det")) == n_card
    full = browser.find_element(By.CSS_SELECTOR, "#viewer-stage img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", full) == 320
    browser.find_element(By.ID, "viewer-close").click()

    # No request left the machine; the thumbnails and images did load from disk.
    urls = _requests(browser)
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    assert any("/thumbs/" in u for u in urls)
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]

    png = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    pixels = np.asarray(png)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 50  # not blank


def test_browser_eval_report_draws_ground_truth_and_predictions(browser, eval_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    records = _journal(eval_run)
    _open(browser, eval_run / "report.html")
    assert browser.find_element(By.ID, "eval-section").is_displayed()
    assert browser.execute_script("return document.querySelectorAll('#gallery rect.gt').length") == sum(
        len(r["gt"]) for r in records)
    assert _drawn(browser) == _above(records, dict.fromkeys(CLASSES.split(","), 0.25))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pr-curves svg polyline")) >= 1
    before = browser.execute_script("return window.ovdetReport.renders")
    Select(browser.find_element(By.ID, "sort")).select_by_value("fp")
    _wait_render(browser, before)
    fps = [int(c.text.split(" · ")[1].split()[0]) for c in browser.find_elements(By.CSS_SELECTOR, "#gallery .cap")]
    assert fps == sorted(fps, reverse=True)
    assert all(u.startswith(("file:", "data:")) for u in _requests(browser))
    legend = browser.find_elements(By.CSS_SELECTOR, "#legend .legend-item")
    assert [e.text for e in legend] == ["ground truth", "prediction"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#legend rect[stroke-dasharray='5 3']")) == 1
    shaded = browser.execute_script(
        "return [...document.querySelectorAll('#confusion td')].map((td) => td.style.background)")
    assert any(b.startswith("rgba(47, 111, 222") for b in shaded)  # set through the CSSOM, which the CSP allows
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # no CSP violation, no missing file
