"""Masks: quality on a held-out synth world, per-image cost of each segmenter, RSS over a long annotate run.

    python benchmarks/bench_masks.py quality [--images 200]        # mask mAP, demo boxes + grabcut vs rectangles
    python benchmarks/bench_masks.py speed [--segmenters ...] [--boxes 1,10,50] [--runs 1]
    python benchmarks/bench_masks.py rss [--images 2000]           # annotate --masks grabcut, RSS sampled

quality: the demo detector (trained on synth seed 0) on a held-out world (seed 1000, 160 px, its 9 classes); the
ground truth is the world's exact instance masks (ovdet.jobs.synth render(masks=True)); pycocotools COCOeval
scores the same boxes three ways: box mAP, masks from grabcut, and each box filled as a rectangle (the trivial
baseline a segmenter has to beat).
speed: one 640×480 synth image with N boxes (the world's own objects, more placed at random when it has fewer),
on the CPU; "one call" segments all N boxes in one segment() call (SAM: the encoder once, every box in one decoder
call), "per box" makes N calls of one box each (SAM: N encoder passes). The SAM models have random weights built by
ultralytics' builders at their real size (no download here): the cost is that of the published ones. Per-box
times for 50 boxes are the 10-box time × 5 unless --per-box-max is raised (marked "≈").
rss: `annotate_folder(..., masks="grabcut")` over N synth images (160 px), RSS sampled every 0.2 s; flat means the
masks are not kept (each image's masks are RLEs at once and written).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _coco_eval(gt: dict, dets: list[dict], kind: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) of `dets` against the COCO dict `gt` (iouType `kind`)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = gt
        api.createIndex()
        found = api.loadRes(dets) if dets else None
        if found is None:
            return 0.0, 0.0
        ev = COCOeval(api, found, kind)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


def quality(images: int) -> None:
    from ovdet.detector import OVDetector
    from ovdet.jobs.synth import WorldSpec, image_rng, render
    from ovdet.masks import create_segmenter, rle

    spec = WorldSpec()
    det = OVDetector("demo", device="cpu", backend="torch", conf=0.01, max_det=100)
    det.set_classes(spec.names)
    grabcut = create_segmenter("grabcut")
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(spec.names)]}
    boxes_out, cut_out, rect_out = [], [], []
    seconds = 0.0
    for i in range(images):
        img, boxes, class_ids, parts = render(image_rng(1000, "val", i), spec, masks=True)
        h, w = img.shape[:2]
        gt["images"].append({"id": i + 1, "width": w, "height": h})
        for part, box, c in zip(parts, boxes, class_ids):
            r = rle.encode_part(part, h, w)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                                      "segmentation": r, "area": rle.area(r), "iscrowd": 0,
                                      "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                               float(box[3] - box[1])]})
        found = det.detect(img, masks=False)
        start = time.perf_counter()
        masks = grabcut.segment_parts(img, found.xyxy)
        seconds += time.perf_counter() - start
        rect = [rle.encode_part(p, h, w) for p in _rectangles(found.xyxy, w, h)]
        for (x1, y1, x2, y2), c, s, m, rr in zip(found.xyxy.tolist(), found.class_id.tolist(),
                                                 found.confidence.tolist(), masks, rect):
            common = {"image_id": i + 1, "category_id": c + 1, "score": s}
            boxes_out.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            cut_out.append({**common, "segmentation": rle.encode_part(m, h, w)})
            rect_out.append({**common, "segmentation": rr})
    rows = [("boxes (box mAP, for reference)", _coco_eval(gt, boxes_out, "bbox")),
            ("boxes filled as rectangles (mask mAP)", _coco_eval(gt, rect_out, "segm")),
            ("boxes + grabcut (mask mAP)", _coco_eval(gt, cut_out, "segm"))]
    print(f"held-out synth world: seed 1000, {images} images of 160×160, {len(gt['annotations'])} objects; "
          f"demo detector, conf 0.01; grabcut {1000 * seconds / images:.1f} ms/image")
    print("| masks from | mAP50 | mAP50-95 |\n| --- | --- | --- |")
    for name, (m50, m) in rows:
        print(f"| {name} | {m50:.3f} | {m:.3f} |")


def _rectangles(boxes: np.ndarray, width: int, height: int) -> list:
    from ovdet.masks.base import MaskPart, pixel_rects

    rects, usable = pixel_rects(boxes, width, height)
    return [MaskPart(x0, y0, np.ones((y1 - y0, x1 - x0), bool)) if ok else MaskPart.empty()
            for (x0, y0, x1, y1), ok in zip(rects.tolist(), usable)]


def _scene(n: int) -> tuple[np.ndarray, np.ndarray]:
    from ovdet.jobs.synth import WorldSpec, image_rng, render

    img, boxes, _ = render(image_rng(5, "val", 0), WorldSpec(canvas=(640, 480), object_px=(32, 96), objects=(n, n)))
    rng = np.random.default_rng(0)
    while len(boxes) < n:  # a crowded image: more boxes at random
        x, y = rng.uniform(0, 560), rng.uniform(0, 400)
        side = rng.uniform(32, 96, 2)
        boxes = np.concatenate([boxes, [[x, y, min(640, x + side[0]), min(480, y + side[1])]]]).astype(np.float32)
    return img, boxes[:n]


def _segmenter(name: str):
    import torch

    from ovdet.masks import create_segmenter
    from ovdet.masks.sam import SamSegmenter, build_sam_model

    if name == "grabcut":
        return create_segmenter(name)
    torch.manual_seed(0)
    return SamSegmenter(name, build_sam_model(name), device="cpu")


def _time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(segmenters: list[str], counts: list[int], runs: int, per_box_max: int) -> None:
    import torch

    print(f"640×480 image, CPU, {torch.get_num_threads()} torch threads; median of {runs} run(s); seconds per image")
    print("| segmenter | boxes | one call | per box |\n| --- | --- | --- | --- |")
    for name in segmenters:
        seg = _segmenter(name)
        img, _ = _scene(1)
        seg.segment_parts(img, [[10, 10, 60, 60]])  # warm-up
        per_box_unit = None
        for n in counts:
            img, boxes = _scene(n)
            one = _time(lambda: seg.segment_parts(img, boxes), runs)
            if n <= per_box_max:
                each = _time(lambda: [seg.segment_parts(img, boxes[i:i + 1]) for i in range(n)], runs)
                per_box_unit, shown = each / n, f"{each:.2f}"
            else:
                shown = f"≈{per_box_unit * n:.2f}" if per_box_unit is not None else "-"
            print(f"| {name} | {n} | {one:.2f} | {shown} |", flush=True)
        del seg


def rss(images: int) -> None:
    import psutil

    from ovdet.jobs.annotate import annotate_folder
    from ovdet.jobs.synth import WorldSpec, image_rng, render

    spec = WorldSpec()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i in range(images):
            cv2.imwrite(str(src / f"{i:05d}.png"), render(image_rng(7, "val", i), spec)[0])
        samples: list[tuple[float, float]] = []
        done = threading.Event()
        proc = psutil.Process()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.perf_counter(), proc.memory_info().rss / 2**20))
                time.sleep(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        start = time.perf_counter()
        thread.start()
        summary = annotate_folder(src, spec.names, Path(tmp) / "out", formats="coco,yolo,voc,jsonl", model="demo",
                                  backend="torch", device="cpu", masks="grabcut", quiet=True)
        done.set()
        thread.join()
        total = time.perf_counter() - start
    n_det = sum(summary.detections_per_class.values())
    print(f"annotate --masks grabcut, {images} images of 160×160, {n_det} masks, {total:.0f} s "
          f"({images / total:.1f} img/s)")
    print("| progress | RSS (MiB) |\n| --- | --- |")
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        t = start + frac * total
        before = [mb for ts, mb in samples if ts <= t]
        print(f"| {int(frac * 100)}% | {max(before) if before else float('nan'):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("quality", "speed", "rss"))
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--segmenters", default="grabcut,mobile_sam,sam2.1_t,sam2.1_b,sam_b")
    parser.add_argument("--boxes", default="1,10,50")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--per-box-max", type=int, default=10)
    args = parser.parse_args()
    if args.what == "quality":
        quality(args.images or 200)
    elif args.what == "speed":
        speed(args.segmenters.split(","), [int(n) for n in args.boxes.split(",")], args.runs, args.per_box_max)
    else:
        rss(args.images or 2000)


if __name__ == "__main__":
    main()
