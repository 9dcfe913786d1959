"""mAP of the demo model per backend and precision on its held-out synth world (accuracy, not speed).

    python benchmarks/accuracy_precisions.py [--val 200] [--seed 0] [--calib DIR]

bf16 and int8 are judged by accuracy, not equality: their mAP50-95 should stay within 0.01 of fp32's.
Prints one row per (backend, precision), with the first-start time (export / quantize / compile, or cache load).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ovdet import OVDetector
from ovdet.jobs.evaluate import evaluate, load_dataset
from ovdet.jobs.synth import WorldSpec, generate

ROWS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=200, help="held-out images (the demo's val split has 200)")
    ap.add_argument("--seed", type=int, default=0, help="synth seed (0: the demo's own world, val split unseen)")
    ap.add_argument("--calib", default=None, help="int8 calibration folder (default: ovdet's default)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ovdet-acc-"))
    data = generate(work / "world", train=1, val=args.val, seed=args.seed, spec=WorldSpec(imgsz=160), progress=False)
    dataset = load_dataset(data, split="val")
    print(f"demo model, {args.val} held-out images (seed {args.seed}), imgsz 160, calib {args.calib or 'default'}")
    print("| backend | precision | mAP50 | mAP50-95 | Δ mAP50-95 vs torch fp32 | first start s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    base = None
    for backend, precision in ROWS:
        start = time.perf_counter()
        det = OVDetector("demo", device="cpu", backend=backend, precision=precision, calib=args.calib,
                         threads=args.threads)
        det.set_classes(dataset.names)
        det.detect(str(dataset.images[0].path))  # first start: export / quantize / compile or cache load
        first = time.perf_counter() - start
        result = evaluate(det, dataset, conf=0.001, progress=False)
        base = result.map50_95 if base is None else base
        print(f"| {backend} | {precision} | {result.map50:.4f} | {result.map50_95:.4f} | "
              f"{result.map50_95 - base:+.4f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
