"""Review speed: `ovdet relabel` over a large run, and opening the report of a 10,000-image run in a real browser.

    python benchmarks/bench_review.py --relabel-images 100000 --report-images 10000

Builds synthetic run folders (run.json + predictions.jsonl shaped exactly as `ovdet annotate` writes them, ~8
boxes per image over 5 classes, pointing at a few generated JPEGs) so no model is needed, then measures:

- relabel: `relabel_run` writing all four formats, and JSONL only (no per-image files), images/s;
- report: `write_report` (first call makes the thumbnails, a second call reuses them), the page's size, and in
  headless Debian chromium the time from navigation start to the page being drawn (`window.ovdetReport.ready`)
  and the time one slider move takes to redraw (counts, histograms, sort, the gallery page), median of --opens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from ovdet.jobs.relabel import relabel_run
from ovdet.report import write_report

CLASSES = ["person", "helmet", "forklift", "pallet", "vest"]


def fake_run(root: Path, images: int, seed: int = 0, distinct: int = 40) -> Path:
    """A run folder of `images` records (as annotate writes them) over `distinct` real JPEGs."""
    rng = np.random.default_rng(seed)
    src = root / "images"
    src.mkdir(parents=True)
    files = []
    for i in range(distinct):
        img = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        path = src / f"img{i:03d}.jpg"
        cv2.imwrite(str(path), cv2.GaussianBlur(img, (0, 0), 5))
        files.append(str(path))
    run = root / "run"
    run.mkdir()
    settings = {"source": str(src), "classes": {"classes": [{"name": n, "prompts": [n], "conf": None} for n in CLASSES],
                                                "negatives": [], "templates": [], "reduce": "max"},
                "model": "bench", "conf": 0.1, "formats": ["coco", "yolo", "voc", "jsonl"]}
    (run / "run.json").write_text(json.dumps({"version": 1, "settings": settings}))
    with open(run / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for i in range(images):
            n = int(rng.integers(0, 17))
            xy = rng.uniform(0, 560, (n, 2)).round(2)
            wh = rng.uniform(10, 80, (n, 2)).round(2)
            cls = rng.integers(0, len(CLASSES), n)
            scores = rng.uniform(0.1, 1.0, n).round(5)
            dets = [{"class_id": int(c), "class_name": CLASSES[c], "score": float(s),
                     "bbox": [float(x), float(y), float(x + w), float(y + h)]}
                    for c, s, (x, y), (w, h) in zip(cls, scores, xy, wh)]
            rec = {"image": f"frame{i:06d}.jpg", "path": files[i % distinct], "key": f"frame{i:06d}", "width": 640,
                   "height": 480, "detections": dets}
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
    return run


def bench_relabel(root: Path, images: int) -> None:
    run = fake_run(root / "relabel", images)
    boxes = sum(len(json.loads(line)["detections"]) for line in open(run / "predictions.jsonl", encoding="utf-8"))
    print(f"relabel: {images} images, {boxes} boxes")
    for fmt in ("jsonl", "coco,yolo,voc,jsonl"):
        out = root / f"relabelled-{fmt.count(',')}"
        t = time.perf_counter()
        s = relabel_run(run, out, conf="person=0.4,helmet=0.3", default_conf=0.25, formats=fmt, quiet=True)
        dt = time.perf_counter() - t
        print(f"  formats {fmt:<20} {dt:7.2f} s  {images / dt:9.0f} img/s  (kept {s.kept}, dropped {s.dropped})")
        shutil.rmtree(out)


def bench_report(root: Path, images: int, opens: int) -> None:
    run = fake_run(root / "report", images, seed=1)
    t = time.perf_counter()
    write_report(run, quiet=True)
    first = time.perf_counter() - t
    t = time.perf_counter()
    path = write_report(run, quiet=True)
    second = time.perf_counter() - t
    print(f"report: {images} images; write_report {first:.1f} s with thumbnails, {second:.2f} s reusing them; "
          f"report.html {path.stat().st_size / 1e6:.1f} MB")
    browser_times(path, opens)


def browser_times(path: Path, opens: int) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("  browser: skipped (apt-get install chromium chromium-driver)")
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        ready, init, moves = [], [], []
        for _ in range(opens):
            driver.get("about:blank")
            driver.get(path.resolve().as_uri())
            while not driver.execute_script("return !!(window.ovdetReport && window.ovdetReport.ready)"):
                time.sleep(0.01)
            ready.append(driver.execute_script("return performance.now()"))  # ms since navigation start, upper bound
            init.append(driver.execute_script("return window.ovdetReport.initMs"))
            slider = driver.find_element(By.ID, "thr-0")
            before = driver.execute_script("return window.ovdetReport.renders")
            t = time.perf_counter()
            slider.send_keys(Keys.ARROW_RIGHT)
            while driver.execute_script("return window.ovdetReport.renders") <= before:
                time.sleep(0.002)
            moves.append((time.perf_counter() - t) * 1000)
        print(f"  browser (chromium, median of {opens}): page drawn {statistics.median(ready):.0f} ms after navigation "
              f"start (script {statistics.median(init):.0f} ms of it); one slider step redrawn in "
              f"{statistics.median(moves):.0f} ms (incl. WebDriver round trips)")
    finally:
        driver.quit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relabel-images", type=int, default=100_000)
    ap.add_argument("--report-images", type=int, default=10_000)
    ap.add_argument("--opens", type=int, default=3, help="browser opens to take the median of")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.relabel_images:
            bench_relabel(Path(tmp), args.relabel_images)
        if args.report_images:
            bench_report(Path(tmp), args.report_images, args.opens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
