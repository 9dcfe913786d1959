"""Backends side by side at the SAME thread count: ultralytics (torch, and its own baked OpenVINO export) vs ovdet
at its defaults (backend and precision auto), on torch, OpenVINO fp32 / bf16 / int8 and ONNX Runtime; detect latency,
batch and annotate throughput, the model alone (forward passes on pre-letterboxed batches) with its GFLOP/s against
the CPU's peak for that precision (benchmarks/roofline.py), set_classes warm and cold, first start vs cached start.

    python benchmarks/bench_backends.py [--threads 2] [--runs 10] [--images 40] [--imgsz 640] [--static-baked]
                                        [--sides auto:auto,openvino:fp32,...]

One process, the same weights on every side (random-init yolov8s-worldv2 with the class bias set so that ~25 boxes
per image pass conf 0.25, as in bench_annotate.py; speed does not depend on the weights' values), the same 80 class
embeddings (COCO names through a random-init CLIP ViT-B/32-sized text tower), the same 1280x720 images, imgsz 640.
Every side runs with --threads threads: torch via torch.set_num_threads (ultralytics' predictor resets it to
cores - 1 when it sets up; it is set back before timing), OpenVINO via INFERENCE_NUM_THREADS (ultralytics' own
OpenVINO runtime gets it through its ov.Core, as does the f32 precision hint for its "fp32" row: left alone,
OpenVINO runs ultralytics' export in bf16 on CPUs that have it), ONNX Runtime via intra-op threads.
Timed calls are interleaved side by side (a shared machine's load hits all alike); medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_annotate import world_checkpoint  # noqa: E402
from bench_core import COCO80, interleaved_median_ms  # noqa: E402
from conftest import random_embeddings, scene  # noqa: E402
from roofline import CPU, forward_gflop  # noqa: E402

# ovdet's sides: its defaults first (backend auto, precision auto: OpenVINO, bf16 on CPUs with native bf16), then each
# backend and precision asked for by name
OVDET_SIDES = [("auto", "auto"), ("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
               ("onnxruntime", "fp32")]


def text_tower():
    from ovdet.text.tower import TextEncoder

    return TextEncoder.random(seed=0, hidden_size=512, num_hidden_layers=12, num_attention_heads=8)


def patch_openvino_core(threads: int, f32: bool) -> None:
    """Make every ov.Core (ultralytics' runtime creates its own) use `threads` and, if asked, f32 inference."""
    import openvino as ov

    base = getattr(ov.Core, "_ovdet_base", ov.Core)

    class Core(base):
        _ovdet_base = base

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            props = {"INFERENCE_NUM_THREADS": threads}
            if f32:
                props["INFERENCE_PRECISION_HINT"] = ov.Type.f32
            self.set_property("CPU", props)

    ov.Core = Core


class UltralyticsSide:
    """ultralytics' predict on a YOLOWorld (torch) or on its own baked OpenVINO export, pinned to `threads`."""

    def __init__(self, name: str, model_path: Path, names: list[str], embeddings: torch.Tensor | None, args,
                 ov_f32: bool | None = None):
        from ultralytics import YOLO, YOLOWorld

        self.name, self.args, self.ov_f32 = name, args, ov_f32
        self._patch()
        if embeddings is not None:  # torch: set the embeddings on the model, as YOLOWorld.set_classes would
            self.model = YOLOWorld(str(model_path))
            self.model.model.txt_feats = embeddings[None].clone()
            self.model.model.model[-1].nc = len(names)
            self.model.model.names = dict(enumerate(names))
        else:
            self.model = YOLO(str(model_path), task="detect")
        self.kwargs = dict(imgsz=args.imgsz, conf=0.25, iou=0.7, device="cpu", verbose=False)
        self.predict(np.zeros((720, 1280, 3), np.uint8))  # sets the predictor up (and torch's threads: reset below)
        torch.set_num_threads(args.threads)

    def _patch(self) -> None:
        if self.ov_f32 is not None:
            patch_openvino_core(self.args.threads, self.ov_f32)

    def predict(self, images, **extra):
        return self.model.predict(images, **self.kwargs, **extra)

    def annotate(self, src: Path, out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t = time.perf_counter()
        n = 0
        for r in self.model.predict(source=str(src), stream=True, **self.kwargs):
            r.save_txt(str(out / f"{Path(r.path).stem}.txt"))
            n += 1
        return n / (time.perf_counter() - t)


def ovdet_detector(ckpt: Path, backend: str, precision: str, args, text=None):
    from ovdet import OVDetector

    return OVDetector(ckpt, text_model=text, device="cpu", imgsz=args.imgsz, backend=backend, precision=precision,
                      threads=args.threads, calib=args.calib)


def start_child(args) -> None:
    """In a fresh process, after the imports: construct the detector, set 80 embeddings, detect once; print the
    seconds as JSON."""
    import torch as _torch

    import ovdet.detector  # noqa: F401 - imports are not part of the start

    _torch.set_num_threads(args.threads)
    t = time.perf_counter()
    det = ovdet_detector(Path(args.ckpt), args.backend, args.precision, args)
    det.set_embeddings(COCO80, random_embeddings(len(COCO80)))
    det.detect(scene(720, 1280, seed=0))
    info = getattr(det.world.backend, "build_info", None)
    print(json.dumps({"seconds": time.perf_counter() - t, "cached": getattr(info, "cached", None)}))


def starts(ckpt: Path, home: Path, args) -> dict[tuple[str, str], tuple[float, float]]:
    """(first start, cached start) seconds per ovdet side, each in a fresh process sharing one $OVDET_HOME."""
    out = {}
    env = {**os.environ, "OVDET_HOME": str(home), "OVDET_OFFLINE": "1"}
    for backend, precision in OVDET_SIDES:
        got = []
        for _ in range(2):
            cmd = [sys.executable, __file__, "--start-child", "--ckpt", str(ckpt), "--backend", backend,
                   "--precision", precision, "--threads", str(args.threads), "--imgsz", str(args.imgsz)]
            if args.calib:
                cmd += ["--calib", args.calib]
            child = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            got.append(json.loads(child.stdout.strip().splitlines()[-1]))
        assert got[1]["cached"] in (True, None), got  # the second start must come from the compiled-model cache
        out[(backend, precision)] = (got[0]["seconds"], got[1]["seconds"])
        print(f"  start {backend} {precision}: first {got[0]['seconds']:.1f} s, cached {got[1]['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads of every side")
    parser.add_argument("--runs", type=int, default=10, help="timed single images per side (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="images per detect_batch / annotate forward pass")
    parser.add_argument("--images", type=int, default=40, help="1280x720 JPEGs in the annotate folder (0: skip)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--calib", default=None, help="int8 calibration folder (default: ovdet's default)")
    parser.add_argument("--no-starts", action="store_true", help="skip the first/cached start measurements")
    parser.add_argument("--static-baked", action="store_true",
                        help="ultralytics' OpenVINO export static (its default: every image padded to imgsz x imgsz) "
                             "instead of dynamic")
    parser.add_argument("--sides", default=None, metavar="B:P,...",
                        help="ovdet sides to run, as backend:precision (default: " +
                             ",".join(f"{b}:{p}" for b, p in OVDET_SIDES) + ")")
    parser.add_argument("--workdir", default=None, help="keep generated files here")
    parser.add_argument("--start-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.start_child:
        return start_child(args)
    if args.sides:
        OVDET_SIDES[:] = [tuple(side.split(":", 1)) for side in args.sides.split(",")]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(args, work)


def run(args, work: Path) -> None:
    import openvino as ov

    from ovdet.jobs.export import export_model

    home = work / "home"
    os.environ["OVDET_HOME"] = str(home)  # fresh embedding and compiled-model caches, not the user's
    os.environ["OVDET_OFFLINE"] = "1"
    ckpt = world_checkpoint("yolov8s-worldv2.yaml", work / "yolov8s-worldv2.pt")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start_times = {} if args.no_starts else starts(ckpt, home, args)

    text = text_tower()
    log("ovdet detectors")
    dets = {}
    for backend, precision in OVDET_SIDES:  # second start in this process: the compiled-model cache serves them
        det = ovdet_detector(ckpt, backend, precision, args, text)
        t = time.perf_counter()
        det.set_classes(COCO80)  # the first one encodes 80 prompts, the others hit the embedding cache
        det.detect(scene(720, 1280, seed=0))
        dets[(backend, precision)] = det
        log(f"  {backend} {precision}: ready in {time.perf_counter() - t:.1f} s ({det.world.describe()})")
    embeddings = next(iter(dets.values())).world._txt_feats[0].float().cpu()

    log("ultralytics sides (and its baked OpenVINO export)")
    # dynamic: ultralytics then letterboxes 1280x720 to 640x384 as ovdet does (its default static export pads every
    # image to 640x640, 1.67x the pixels: --static-baked measures that one)
    baked = export_model(ckpt, "openvino", classes=COCO80, out=work / "baked_openvino_model", imgsz=args.imgsz,
                         text_model=text, dynamic=not args.static_baked)
    kind = "static 640x640" if args.static_baked else "dynamic"
    real_core = ov.Core
    uls = {"torch": UltralyticsSide("ultralytics YOLOWorld.predict (torch fp32)", ckpt, COCO80, embeddings, args)}
    uls["ov-f32"] = UltralyticsSide(f"ultralytics predict, own OpenVINO export ({kind}), f32", baked.path, COCO80,
                                    None, args, ov_f32=True)
    own = "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    uls["ov-default"] = UltralyticsSide(f"ultralytics predict, own OpenVINO export ({kind}), OpenVINO's default "
                                        f"precision ({own} on this CPU)", baked.path, COCO80, None, args,
                                        ov_f32=False)
    ov.Core = real_core
    assert torch.get_num_threads() == args.threads

    images = [scene(720, 1280, seed=i) for i in range(max(args.runs, args.batch))]
    sides = [(s.name, s.predict, lambda b, s=s: s.predict(b)) for s in uls.values()]
    for (backend, precision), det in dets.items():
        sides.append((side_name(det, backend, precision), det.detect, det.detect_batch))
    for _, single, _ in sides:  # warm-up
        single(images[0])
    log("timing single images")
    single_ms = interleaved_median_ms([lambda i, f=f: f(images[i % len(images)]) for _, f, _ in sides], args.runs)
    log("timing batches")
    batch = images[:args.batch]
    batch_ms = [t / args.batch for t in interleaved_median_ms([lambda i, f=f: f(batch) for _, _, f in sides],
                                                    max(3, args.runs // 3))]
    annotate_ips = annotate_all(args, work, uls, dets) if args.images else {}
    log("timing the model alone")
    model_only = model_only_throughput(args, dets, images[:args.batch], embeddings)

    log("set_classes")
    vocab = vocabulary_switch(dets, text)

    ref_single, ref_batch = single_ms[0], batch_ms[0]
    ref_annotate = annotate_ips.get(sides[0][0])
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    print(f"\nthreads={args.threads} on every side ({os.cpu_count()} CPUs: {' '.join(caps)}), yolov8s-worldv2 "
          f"(random init), 80 classes, 1280x720 images, imgsz {args.imgsz}, batch {args.batch}, median of "
          f"{args.runs} (batches: {max(3, args.runs // 3)}), torch {torch.__version__}, openvino {ov.__version__}\n")
    print(f"| side | detect, ms/image | vs ultralytics torch | detect_batch ({args.batch}), ms/image | vs | annotate, "
          "images/s | vs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, _, _), s_ms, b_ms in zip(sides, single_ms, batch_ms):
        ips = annotate_ips.get(name)
        ann = f"{ips:.2f} | {ips / ref_annotate:.2f}×" if ips and ref_annotate else "– | –"
        print(f"| {name} | {s_ms:.1f} | {ref_single / s_ms:.2f}× | {b_ms:.1f} | {ref_batch / b_ms:.2f}× | {ann} |")
    print_model_only(args, dets, model_only, annotate_ips)
    print("\n| ovdet backend | first start, s | cached start, s | set_classes warm, ms | set_classes cold, ms | "
          "first detect after a vocabulary change, ms | steady detect, ms | exports on vocabulary changes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key in dets:
        first, cached = start_times.get(key, (float("nan"), float("nan")))
        v = vocab[key]
        print(f"| {key[0]} {key[1]} | {first:.1f} | {cached:.1f} | {v['warm']:.2f} | {v['cold']:.0f} | "
              f"{v['first_after']:.1f} | {v['steady']:.1f} | {v['exports']} |")


def side_name(det, backend: str, precision: str) -> str:
    """How a side is named in the tables: the defaults say what they resolved to."""
    if (backend, precision) == ("auto", "auto"):
        return f"ovdet defaults ({det.backend} {det.precision})"
    return f"ovdet {backend} {precision}"


def model_only_throughput(args, dets: dict, images: list, embeddings: torch.Tensor) -> dict:
    """Per ovdet side: images/s of the backend's forward pass alone on one pre-letterboxed batch (no decode, letterbox,
    NMS or writing), sides interleaved; and the GFLOP of one image's forward pass (the same graph on every side;
    torch's count agrees with ultralytics' get_flops: 32.7 GFLOP for yolov8s-worldv2 at 640x640)."""
    batch = next(iter(dets.values())).world.preprocess(images, args.imgsz)
    txt = embeddings[None]
    model = next(iter(dets.values())).world.model  # any side's weights: the FLOPs are the graph's, not the runtime's
    gflop = forward_gflop(model, batch[:1], txt)
    fns = [lambda i, det=det: det.world.backend.run(batch, txt) for det in dets.values()]
    for fn in fns:  # warm-up: this batch shape
        fn(0)
    ms = interleaved_median_ms(fns, max(3, args.runs // 2))
    shape = f"{len(images)}x3x{batch.shape[2]}x{batch.shape[3]}"
    return {"shape": shape, "gflop": gflop, "ips": {key: len(images) * 1000 / t for key, t in zip(dets, ms)}}


def print_model_only(args, dets: dict, model_only: dict, annotate_ips: dict) -> None:
    cpu = CPU.read()
    print(f"\nthe model alone: forward passes on one pre-letterboxed batch {model_only['shape']}, median of "
          f"{max(3, args.runs // 2)}; {model_only['gflop']:.1f} GFLOP per image (torch FlopCounterMode, 2 per "
          f"multiply-add); peak = {min(args.threads, cpu.cores)} cores x {cpu.ghz:.2f} GHz ({cpu.clock_source}) x "
          "FLOPs per core per cycle (benchmarks/roofline.py)\n")
    print("| ovdet side | model alone, images/s | annotate / model alone | achieved GFLOP/s | peak GFLOP/s | of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (backend, precision), det in dets.items():
        name = side_name(det, backend, precision)
        ips = model_only["ips"][(backend, precision)]
        ann = annotate_ips.get(name)
        achieved = ips * model_only["gflop"]
        runs = det.precision  # the precision that ran (auto resolved)
        peak = cpu.peak_gflops(runs, args.threads)
        how = cpu.per_cycle(runs)[1]
        ratio = f"{ann / ips:.2f}" if ann else "–"
        print(f"| {name} | {ips:.2f} | {ratio} | {achieved:.0f} | {peak:.0f} ({runs}: {how}) | "
              f"{achieved / peak:.0%} |")


def annotate_all(args, work: Path, uls: dict, dets: dict) -> dict[str, float]:
    """images/s of a folder annotation (YOLO txt) per side, best of two, sides interleaved."""
    from ovdet import annotate_folder

    src = work / f"images{args.images}"
    src.mkdir(exist_ok=True)
    for i in range(args.images):
        path = src / f"{i:05d}.jpg"
        if not path.exists():
            cv2.imwrite(str(path), scene(720, 1280, seed=100 + i), [cv2.IMWRITE_JPEG_QUALITY, 90])
    best: dict[str, float] = {}

    def ovdet_run(det, out):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        s = annotate_folder(src, COCO80, out, formats="yolo", detector=det, imgsz=args.imgsz, batch=args.batch,
                            quiet=True)
        assert s.images_done == args.images
        return args.images / (time.perf_counter() - t)

    for _ in range(2):
        for side in uls.values():
            best[side.name] = max(best.get(side.name, 0), side.annotate(src, work / "out_ul"))
            torch.set_num_threads(args.threads)
        for (backend, precision), det in dets.items():
            name = side_name(det, backend, precision)
            best[name] = max(best.get(name, 0), ovdet_run(det, work / "out_ovdet"))
        print(f"  annotate pass: {json.dumps({k: round(v, 2) for k, v in best.items()})}", file=sys.stderr,
              flush=True)
    return best


def vocabulary_switch(dets: dict, text) -> dict:
    """Per backend: set_classes between two cached vocabularies (warm), with 80 new prompts (cold, tower in
    memory), the first detect after a change of K, a steady detect, and how many exports the changes caused."""
    small = COCO80[:20]
    image = scene(720, 1280, seed=1)
    out = {}
    for n, ((backend, precision), det) in enumerate(dets.items()):
        det.set_classes(small)  # both vocabularies in the embedding cache
        det.set_classes(COCO80)
        exports = getattr(det.world.backend, "exports", 0)
        warm = []
        for i in range(10):
            t = time.perf_counter()
            det.set_classes(small if i % 2 == 0 else COCO80)
            warm.append((time.perf_counter() - t) * 1000)
        det.set_classes(small)
        t = time.perf_counter()
        det.detect(image)
        first_after = (time.perf_counter() - t) * 1000
        steady = statistics.median(_timed(lambda: det.detect(image)) for _ in range(3))
        t = time.perf_counter()
        det.set_classes([f"{name} number {n}" for name in COCO80])  # 80 prompts never seen: the tower encodes
        cold = (time.perf_counter() - t) * 1000
        det.detect(image)
        out[(backend, precision)] = {"warm": statistics.median(warm), "cold": cold, "first_after": first_after,
                                     "steady": steady,
                                     "exports": getattr(det.world.backend, "exports", 0) - exports}
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


if __name__ == "__main__":
    main()
