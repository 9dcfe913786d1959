"""OpenVINO fp32, the model alone: one LATENCY stream vs THROUGHPUT streams with requests in flight, same threads.

    python benchmarks/bench_ov_streams.py [--threads 2] [--batch 8] [--runs 5] [--imgsz 640]

Random-init yolov8s-worldv2 (as bench_backends.py builds it), 80 random class embeddings, one pre-letterboxed batch
of `--batch` 1280x720 scenes (640x384 at imgsz 640). The IR is ovdet's compiled-model cache entry for openvino fp32;
each configuration compiles it with the same INFERENCE_NUM_THREADS and f32, and runs the whole batch per timed call:
  latency b=N     PERFORMANCE_HINT LATENCY, 1 stream, one request on the whole batch (ovdet's configuration)
  latency b=1xN   the same compiled model, one request per image, one after the other
  tput S b=N/S    PERFORMANCE_HINT THROUGHPUT, S streams, the batch split in S parts, S requests in flight
  tput S b=1xN    THROUGHPUT, S streams, one image per request, S requests in flight (AsyncInferQueue)
and ovdet's detect_batch of the same 8 images end to end (letterbox, forward, NMS), its backend's `throughput` off
(every batch one LATENCY request, as before) and on (its default: THROUGHPUT streams for batches of 2+), and
`annotate_folder` of --images 1280x720 JPEGs to YOLO labels at batch --batch, off and on (median of max(3, runs/2)
runs; the label files of both must match).
Timed calls are interleaved (a shared machine's load hits all alike); medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_annotate import world_checkpoint  # noqa: E402
from bench_core import COCO80, interleaved_median_ms  # noqa: E402
from conftest import random_embeddings, scene  # noqa: E402


def runner(ov, compiled, parts: int):
    """A function running `images` through `compiled` in `parts` slices, all in flight at once; returns the outputs
    in order (checked against the one-request output below)."""
    queue = ov.AsyncInferQueue(compiled, max(1, min(parts, 64)))
    outs: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: outs.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def run(images: np.ndarray, txt: np.ndarray) -> np.ndarray:
        outs.clear()
        for i, part in enumerate(np.array_split(images, parts)):
            queue.start_async({"images": np.ascontiguousarray(part), "txt_feats": txt}, i)
        queue.wait_all()
        return np.concatenate([outs[i] for i in range(parts)])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--images", type=int, default=24, help="JPEGs annotated per timed run (0: no annotate rows)")
    parser.add_argument("--streams", default="2", help="comma-separated stream counts for the THROUGHPUT rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import openvino as ov

    from ovdet import OVDetector
    from ovdet.backends import graph

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["OVDET_HOME"] = str(work / "home")
        os.environ["OVDET_OFFLINE"] = "1"
        ckpt = world_checkpoint("yolov8s-worldv2.yaml", work / "yolov8s-worldv2.pt")
        det = OVDetector(ckpt, device="cpu", imgsz=args.imgsz, backend="openvino", precision="fp32",
                         threads=args.threads)
        det.set_embeddings(COCO80, random_embeddings(len(COCO80)))
        backend = det.world.backend
        backend.prepare()
        xml = str(backend.build_info.path / "model.xml")
        batch = det.world.preprocess([scene(720, 1280, seed=i) for i in range(args.batch)], args.imgsz)
        images = np.ascontiguousarray(batch.numpy())
        txt = np.ascontiguousarray(det.world._txt_feats.float().numpy())
        assert graph.IMAGES == "images" and graph.TEXT == "txt_feats"
        core = ov.Core()
        base = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
        n = args.batch
        latency = core.compile_model(xml, "CPU", {**base, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        sides = {f"latency 1 stream, b={n} (ovdet today)": runner(ov, latency, 1),
                 f"latency 1 stream, b=1 x {n} in turn": runner(ov, latency, n)}
        for streams in (int(s) for s in args.streams.split(",")):
            tput = core.compile_model(xml, "CPU", {**base, "PERFORMANCE_HINT": "THROUGHPUT",
                                                   "NUM_STREAMS": streams})
            got = tput.get_property("NUM_STREAMS")
            sides[f"throughput {got} streams, b={n}/{streams} in flight"] = runner(ov, tput, streams)
            sides[f"throughput {got} streams, b=1 x {n}, {streams} in flight"] = runner(ov, tput, n)
        want = sides[next(iter(sides))](images, txt)
        for name, fn in sides.items():  # warm-up and the same answer on every side
            diff = float(np.abs(fn(images, txt) - want).max())
            print(f"  {name}: max |diff| vs ovdet today {diff:.2e}", file=sys.stderr, flush=True)
        fns = [lambda i, fn=fn: fn(images, txt) for fn in sides.values()]
        model_rows = len(fns)
        frames = [scene(720, 1280, seed=i) for i in range(n)]

        def detect_batch(throughput: bool):
            def run(i: int) -> None:
                backend.throughput = throughput
                det.detect_batch(frames)
            return run
        for mode in (False, True):
            sides[f"ovdet detect_batch({n}), throughput {'on (default)' if mode else 'off (before)'}"] = None
            fns.append(detect_batch(mode))
            fns[-1](0)  # warm-up
        ms = interleaved_median_ms(fns, args.runs)
        if args.images:
            annotate = annotate_rows(det, work, args)
            sides.update({name: None for name in annotate})
            ms += [args.batch * 1000 / ips for ips in annotate.values()]  # as ms per batch, like the rows above
        print(f"\nopenvino {ov.__version__} fp32, {args.threads} threads, yolov8s-worldv2 (random init), 80 classes, "
              f"batch {n}x3x{images.shape[2]}x{images.shape[3]}, median of {args.runs}, {os.cpu_count()} CPUs\n")
        print("| configuration | images/s | vs the first row of its group |")
        print("| --- | ---: | ---: |")
        for k, (name, t) in enumerate(zip(sides, ms)):
            # the model alone vs ovdet today; the pairs after it: on vs off
            ref = ms[k - (k - model_rows) % 2] if k >= model_rows else ms[0]
            print(f"| {name} | {n * 1000 / t:.2f} | {ref / t:.2f}× |")


def annotate_rows(det, work: Path, args) -> dict[str, float]:
    """images/s of annotate_folder with the backend's throughput mode off and on, runs interleaved; their labels
    must be the same files with the same lines."""
    import statistics
    import time

    import cv2

    from ovdet import annotate_folder

    src = work / "frames"
    src.mkdir()
    for i in range(args.images):
        cv2.imwrite(str(src / f"{i:04d}.jpg"), scene(720, 1280, seed=100 + i), [cv2.IMWRITE_JPEG_QUALITY, 90])
    rates: dict[bool, list[float]] = {False: [], True: []}
    for run in range(max(3, args.runs // 2)):
        for mode in (False, True):
            det.world.backend.throughput = mode
            out = work / f"labels-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            done = annotate_folder(src, COCO80, out, formats="yolo", detector=det, imgsz=args.imgsz,
                                   batch=args.batch, quiet=True)
            rates[mode].append(args.images / (time.perf_counter() - t))
            assert done.images_done == args.images, done
    labels = [{f.name: np.loadtxt(f, ndmin=2) for f in (work / f"labels-{m}").rglob("*.txt")
               if f.parent.name == "labels" and f.stat().st_size} for m in (False, True)]
    assert labels[0].keys() == labels[1].keys() and labels[0], "throughput mode changed which images have boxes"
    for name, rows in labels[0].items():  # class, then normalized xywh: the same boxes (1e-4 of the image)
        assert rows.shape == labels[1][name].shape and np.allclose(rows, labels[1][name], rtol=0, atol=1e-4), name
    det.world.backend.throughput = True
    return {f"ovdet annotate_folder ({args.images} JPEGs, batch {args.batch}), throughput "
            f"{'on (default)' if m else 'off (before)'}": statistics.median(rates[m]) for m in (False, True)}


if __name__ == "__main__":
    main()
