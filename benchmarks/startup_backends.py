"""First start (export, convert, compile) vs second start (compiled-model cache) per backend, one process each.

    python benchmarks/startup_backends.py [--model yolov8s-worldv2.yaml] [--imgsz 640] [--threads N]

A "start" is OVDetector(...) + set_classes + the first detect on one 1280x720 image, in a fresh Python process
(so nothing is warm in memory), with an empty $OVDET_HOME/compiled for the first start and the filled one for the
second. yaml configs build random weights: startup depends on the architecture, not on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from ovdet import OVDetector
from ovdet.text import TextEncoder
t1 = time.perf_counter()
model, backend, precision, imgsz, threads = sys.argv[1:6]
det = OVDetector(model, text_model=TextEncoder.random(seed=0), device="cpu", backend=backend, precision=precision,
                 imgsz=int(imgsz), threads=int(threads) if threads != "0" else None)
det.set_classes(["person", "bus", "red backpack"])
det.detect(np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8))
t2 = time.perf_counter()
info = getattr(det.world.backend, "build_info", None)
print(json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "cached": None if info is None else info.cached}))
"""

ROWS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
        ("openvino", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov8s-worldv2.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args()
    env = {**os.environ, "OVDET_HOME": tempfile.mkdtemp(prefix="ovdet-startup-"), "OVDET_OFFLINE": "1"}
    print(f"{args.model}, imgsz {args.imgsz}, start = construct + set_classes + first detect (fresh process)")
    print("| backend | precision | first start s | second start s (cached) |")
    print("| --- | --- | ---: | ---: |")
    for backend, precision in ROWS:
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, backend, precision, str(args.imgsz),
                                  str(args.threads)], env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"| {backend} | {precision} | {runs[0]['start_s']:.1f} | {runs[1]['start_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
