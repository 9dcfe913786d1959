"""Sliced inference: ovdet `tile=` vs SAHI's get_sliced_prediction, same weights, classes and thread count.

    python benchmarks/bench_tiles.py [--model demo] [--tile 320] [--threads 2] [--runs 3] [--folder 4] [--huge 20000]

Each side runs alone in its own process (its peak RSS is its own; OpenVINO's and torch's thread pools do not
compete), the sides taking turns --rounds times so load drift hits them alike; speed is the median over all timed
runs. Files are read from disk by each side. Cases:
- big: one 8000×6000 PNG of small shapes (ovdet's synth canvas world);
- folder: N 4000×3000 PNGs (ovdet: one detect_batch over the paths, tiles of consecutive images share batches;
  SAHI: get_sliced_prediction per image);
- huge: a 20000×20000 PNG, ovdet only: peak RSS with the libvips strip reader and with the file decoded whole;
- map: mAP50 of the demo model on a large-canvas synth world, untiled vs tiled (ovdet eval).
Both sides: conf 0.25, per-tile NMS IoU 0.7, full-image pass on, SAHI's default merge (class-aware greedy NMM,
IoS 0.5). Agreement: the fraction of SAHI's boxes that an ovdet box of the same class matches at IoU >= 0.9.
SAHI runs the ultralytics YOLOWorld model loaded from the same checkpoint with ovdet's text embeddings set on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_world(out: Path, args: argparse.Namespace) -> dict:
    """The benchmark's images, written once: big.png, folder/*.png, huge.png."""
    import cv2

    from ovdet.jobs.synth import WorldSpec, image_rng, render

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    w, h = (int(v) for v in args.big.split("x"))
    spec = WorldSpec(canvas=(w, h), object_px=(16, 40), objects=(w * h // 150_000, w * h // 150_000))
    files["big"] = [str(out / "big.png")]
    if not Path(files["big"][0]).exists():
        cv2.imwrite(files["big"][0], render(image_rng(1, "val", 0), spec)[0], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    fw, fh = (int(v) for v in args.folder_size.split("x"))
    spec = WorldSpec(canvas=(fw, fh), object_px=(16, 40), objects=(fw * fh // 150_000, fw * fh // 150_000))
    (out / "folder").mkdir(exist_ok=True)
    files["folder"] = []
    for i in range(args.folder):
        path = out / "folder" / f"{i:03d}.png"
        if not path.exists():
            cv2.imwrite(str(path), render(image_rng(2, "val", i), spec)[0], [cv2.IMWRITE_PNG_COMPRESSION, 1])
        files["folder"].append(str(path))
    if args.huge:
        path = out / "huge.png"
        if not path.exists():  # a 4000² canvas repeated by libvips: the PNG is written without 1.2 GB in memory
            import pyvips

            side = 4000
            spec = WorldSpec(canvas=(side, side), object_px=(16, 40), objects=(100, 100))
            block = render(image_rng(3, "val", 0), spec)[0][..., ::-1].copy()
            n = -(-args.huge // side)
            pyvips.Image.new_from_array(block).replicate(n, n).crop(0, 0, args.huge, args.huge).pngsave(
                str(path), compression=1)
        files["huge"] = [str(path)]
    return files


def load_ovdet(args: argparse.Namespace):
    from ovdet import OVDetector
    from ovdet.jobs.synth import WorldSpec

    det = OVDetector(args.model, device=args.device, conf=0.25, max_det=100_000, backend=args.backend,
                     threads=args.threads)
    det.set_classes(WorldSpec().names if args.model == "demo" else args.classes.split(","))
    return det


def make_sides(args: argparse.Namespace, files: list[str], tile: int) -> dict:
    """{side: function running that side over the case's files and returning [N, 6] box arrays}, warmed up."""
    import torch

    from ovdet.tiling import TileSpec

    det = load_ovdet(args)
    warm = np.zeros((tile * 2, tile * 2, 3), np.uint8)
    sides = {}
    if args.side in ("ovdet", "both"):
        spec = TileSpec(size=tile, overlap=args.overlap, merge="nmm", batch=args.batch)
        det.detect(warm, tile=spec)

        def ovdet_side():
            return [np.c_[r.xyxy, r.confidence, r.class_id] for r in det.detect_batch(files, tile=spec)]

        sides["ovdet"] = ovdet_side
    if args.side in ("sahi", "both"):
        from sahi.models.ultralytics import UltralyticsDetectionModel
        from sahi.predict import get_sliced_prediction
        from ultralytics import YOLOWorld

        yolo = YOLOWorld(_demo_path() if args.model == "demo" else args.model)
        yolo.model.txt_feats = det.world._txt_feats.float().cpu().clone()
        yolo.model.model[-1].nc = len(det.classes)
        yolo.model.names = dict(enumerate(det.classes))
        model = UltralyticsDetectionModel(model=yolo, confidence_threshold=0.25, image_size=det.imgsz,
                                          device=args.device)

        def sliced(image):
            return get_sliced_prediction(image, model, slice_height=tile, slice_width=tile,
                                         overlap_height_ratio=args.overlap, overlap_width_ratio=args.overlap,
                                         perform_standard_pred=True, postprocess_type="GREEDYNMM",
                                         postprocess_match_metric="IOS", postprocess_match_threshold=0.5,
                                         postprocess_class_agnostic=False, verbose=0, batch_size=args.sahi_batch)

        def sahi_side():
            return [np.array([[*o.bbox.to_xyxy(), o.score.value, o.category.id] for o in r.object_prediction_list],
                             np.float64).reshape(-1, 6) for r in (sliced(p) for p in files)]

        sliced(warm[..., ::-1].copy())  # ultralytics sets up its predictor (and pins torch's threads) here
        sides["sahi"] = sahi_side
    torch.set_num_threads(args.threads)
    return sides


def worker(args: argparse.Namespace) -> None:
    """One side (or --side both, taking turns) in this process: `runs` timed runs after a warm-up; seconds, peak
    RSS and boxes reported."""
    import torch

    if args.no_stream:
        import ovdet.tiling.reader as reader

        reader.STREAM_PIXELS = 10**12
    files = json.loads(Path(args.files).read_text())[args.case]
    sides = make_sides(args, files, args.huge_tile if args.case == "huge" else args.tile)
    base = _current_rss_mb()
    times: dict[str, list[float]] = {name: [] for name in sides}
    boxes = {}
    for _ in range(max(1, args.runs)):
        for name, fn in sides.items():
            start = time.perf_counter()
            boxes[name] = fn()
            times[name].append(time.perf_counter() - start)
    for name, arrays in boxes.items():
        np.savez(f"{args.boxes}-{name}.npz", *arrays)
    print(json.dumps({"seconds": {k: statistics.median(v) for k, v in times.items()}, "images": len(files),
                      "peak_rss_mb": _rss_mb(), "base_rss_mb": base, "threads": torch.get_num_threads(),
                      "boxes": {k: int(sum(len(b) for b in v)) for k, v in boxes.items()}}))


def timed(fn, runs: int):
    """Median wall seconds of `runs` calls, and the last call's result."""
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _demo_path() -> str:
    from ovdet.weights.registry import DEMO_FILE

    return str(DEMO_FILE)


def run_worker(args: argparse.Namespace, side: str, case: str, files: Path, tmp: Path, *extra: str) -> dict:
    boxes = tmp / f"{side}-{case}{'-'.join(extra)}"
    runs = 1 if case == "huge" else args.runs
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--case", case, "--files", str(files),
           "--boxes", str(boxes), "--model", args.model, "--device", args.device, "--tile", str(args.tile),
           "--huge-tile", str(args.huge_tile), "--overlap", str(args.overlap), "--threads", str(args.threads),
           "--batch", str(args.batch), "--sahi-batch", str(args.sahi_batch), "--classes", args.classes,
           "--runs", str(runs), "--backend", args.backend, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(f"{side} {case} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["box_arrays"] = {}
    for name in result["boxes"]:
        with np.load(f"{boxes}-{name}.npz") as npz:
            result["box_arrays"][name] = [npz[k] for k in sorted(npz.files, key=lambda k: int(k.split("_")[1]))]
    return result


def matched(reference: list[np.ndarray], ours: list[np.ndarray], iou: float = 0.9) -> float:
    """Fraction of the reference boxes that a box of ours of the same class overlaps at IoU >= iou."""
    import supervision as sv

    hit = total = 0
    for ref, mine in zip(reference, ours):
        total += len(ref)
        if len(ref) and len(mine):
            overlap = sv.box_iou_batch(ref[:, :4], mine[:, :4])
            same = ref[:, 5:6] == mine[None, :, 5]
            hit += int(((overlap >= iou) & same).any(1).sum())
    return hit / total if total else 1.0


def map_case(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float]]:
    from ovdet.jobs.evaluate import evaluate, load_dataset
    from ovdet.jobs.synth import WorldSpec, generate
    from ovdet.tiling import TileSpec

    data = tmp / "map-world"
    if not (data / "data.yaml").exists():
        w, h = (int(v) for v in args.map_canvas.split("x"))
        generate(data, train=1, val=args.map_images, seed=7, progress=False,
                 spec=WorldSpec(canvas=(w, h), object_px=(16, 40), objects=(w * h // 60_000, w * h // 60_000)))
    det = load_ovdet(args)
    det.max_det = 300
    ds = load_dataset(data, split="val")
    rows = [("untiled", evaluate(det, ds, progress=False).map50)]
    for size in args.map_tiles:
        for merge in ("nms", "nmm"):
            spec = TileSpec(size=size, overlap=args.overlap, merge=merge)
            rows.append((f"tile {size}, {merge}", evaluate(det, ds, progress=False, tile=spec).map50))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--classes", default="", help="prompts for a non-demo model, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="torch,openvino", help="ovdet backends to run, comma-separated (SAHI "
                        "always runs ultralytics' torch model)")
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=320)
    parser.add_argument("--huge-tile", type=int, default=640)
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1, help="threads of every side (1: robust on a shared machine)")
    parser.add_argument("--batch", type=int, default=16, help="ovdet tiles per forward")
    parser.add_argument("--sahi-batch", type=int, default=1, help="SAHI's batch_size (its default is 1)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per process (after a warm-up); huge: 1")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side and case, taking turns")
    parser.add_argument("--big", default="8000x6000")
    parser.add_argument("--folder", type=int, default=4)
    parser.add_argument("--folder-size", default="4000x3000")
    parser.add_argument("--huge", type=int, default=20000, help="side of the huge PNG (0: skip)")
    parser.add_argument("--map-canvas", default="1600x1200")
    parser.add_argument("--map-images", type=int, default=6)
    parser.add_argument("--map-tiles", type=int, nargs="*", default=[160, 320])
    parser.add_argument("--cases", default="big,folder,huge,map")
    parser.add_argument("--work", default=None, help="folder for the images (kept between runs)")
    # worker mode
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--boxes", help=argparse.SUPPRESS)
    parser.add_argument("--no-stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cases = args.cases.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-tiles-"))
    if "huge" not in cases:
        args.huge = 0
    files = make_world(work / "images", args)
    listing = work / "files.json"
    listing.write_text(json.dumps(files))
    print(f"model {args.model}, device {args.device}, {args.threads} threads on every side, tile {args.tile} "
          f"(huge: {args.huge_tile}), overlap {args.overlap}, ovdet batch {args.batch}, SAHI batch {args.sahi_batch}")
    print("| case | side | images/s | vs SAHI | peak RSS MB (over loaded model) | boxes | SAHI boxes matched |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    backends = args.backends.split(",")
    for case in [c for c in cases if c in ("big", "folder")]:
        results: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # sides take turns, each in a fresh process, so load drift hits them alike
            for side, backend in [("sahi", "torch")] + [("ovdet", b) for b in backends]:
                args.backend = backend
                key = "sahi" if side == "sahi" else backend
                results.setdefault(key, []).append(run_worker(args, side, case, listing, work))
        reference = results["sahi"][0]["box_arrays"]["sahi"]
        secs = {k: statistics.median(r["seconds"][s] for r in rs for s in r["seconds"]) for k, rs in results.items()}
        n = results["sahi"][0]["images"]
        for key, rs in results.items():
            r = rs[0]
            side = "sahi" if key == "sahi" else "ovdet"
            name = "SAHI get_sliced_prediction (torch)" if key == "sahi" else f"ovdet tile= ({key})"
            match = "" if key == "sahi" else f"{matched(reference, r['box_arrays']['ovdet']):.1%}"
            speed = "1.00×" if key == "sahi" else f"{secs['sahi'] / secs[key]:.2f}×"
            print(f"| {case} ({n}) | {name} | {n / secs[key]:.3f} | {speed} | {r['peak_rss_mb']:.0f} "
                  f"({r['peak_rss_mb'] - r['base_rss_mb']:+.0f}) | {r['boxes'][side]} | {match} |", flush=True)
    args.backend = backends[0]
    if "huge" in cases:
        for name, extra in (("strips (libvips)", ()), ("decoded whole", ("--no-stream",))):
            r = run_worker(args, "ovdet", "huge", listing, work, *extra)
            secs = r["seconds"]["ovdet"]
            print(f"| huge {args.huge}² PNG | ovdet tile={args.huge_tile} ({args.backend}), {name} | "
                  f"{r['images'] / secs:.3f} | ({secs:.1f} s) | "
                  f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['base_rss_mb']:+.0f}) | {r['boxes']['ovdet']} | |",
                  flush=True)
    if "map" in cases:
        print(f"\nmAP50, demo model, {args.map_images} synth images of {args.map_canvas} (objects 16-40 px):")
        for name, value in map_case(args, work):
            print(f"- {name}: {value:.3f}")


if __name__ == "__main__":
    main()
