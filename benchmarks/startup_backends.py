"""First start (export, convert, compile) vs second start (compiled-model cache) per backend, one process each.

    python benchmarks/startup_backends.py [--model yolov8s-worldv2.yaml] [--imgsz 640] [--threads N]
                                          [--rows auto:auto,openvino:fp32,...]

A "start" is OVDetector(...) + set_classes + the first detect on one 1280x720 image, in a fresh Python process
(so nothing is warm in memory), after the imports and a random stand-in text tower (timed apart), with an empty
$OVDET_HOME/compiled for the first start and the filled one for the second (which also holds OpenVINO's compiled
blobs and the checkpoint's facts, so the second start of an exported backend neither compiles nor reads the
weights). The first row is ovdet's defaults (backend and precision auto); a row this machine cannot run (bf16
without native bf16) says so. A yaml config is saved once as a checkpoint with seeded random weights (startup
depends on the architecture, not on the weights; the cache is keyed by the weights, so every start must load the
same file).
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
from ovdet.text.tower import TextEncoder
tower = TextEncoder.random(seed=0)  # stands in for a downloaded tower (one whose prompts are cached is never loaded)
t1 = time.perf_counter()
model, backend, precision, imgsz, threads = sys.argv[1:6]
det = OVDetector(model, text_model=tower, device="cpu", backend=backend, precision=precision,
                 imgsz=int(imgsz), threads=int(threads) if threads != "0" else None)
det.set_classes(["person", "bus", "red backpack"])
det.detect(np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8))
t2 = time.perf_counter()
info = getattr(det.world.backend, "build_info", None)
print(json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "cached": None if info is None else info.cached,
                  "backend_s": None if info is None else info.seconds, "runs": f"{det.backend} {det.precision}",
                  "weights_read": det.world.model_loaded}))
"""

ROWS = [("auto", "auto"), ("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
        ("openvino", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov8s-worldv2.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--rows", default=",".join(f"{b}:{p}" for b, p in ROWS), metavar="B:P,...",
                    help="backend:precision rows to measure (default: all)")
    args = ap.parse_args()
    rows = [tuple(row.split(":", 1)) for row in args.rows.split(",")]
    env = {**os.environ, "OVDET_HOME": tempfile.mkdtemp(prefix="ovdet-startup-"), "OVDET_OFFLINE": "1"}
    model = args.model
    if model.endswith((".yaml", ".yml")):
        import torch
        from ultralytics.nn.tasks import WorldModel

        torch.manual_seed(0)
        model = os.path.join(env["OVDET_HOME"], os.path.basename(model).rsplit(".", 1)[0] + ".pt")
        torch.save({"model": WorldModel(args.model, verbose=False), "train_args": {"imgsz": args.imgsz}}, model)
    print(f"{args.model}, imgsz {args.imgsz}, start = construct + set_classes + first detect (fresh process)")
    print("| backend | precision | runs | imports + stand-in tower s | first start s | of which export + compile | "
          "second start s | of which cache load + compile | second start read the weights |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for backend, precision in rows:
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", CHILD, model, backend, precision, str(args.imgsz),
                                  str(args.threads)], env=env, capture_output=True, text=True)
            if out.returncode:
                lines = (out.stderr.strip() or "no output").splitlines()
                print(f"| {backend} | {precision} | refused here: {lines[-1][:160]} | | | | | | |", flush=True)
                break
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if len(runs) < 2:
            continue
        first, second = runs
        part = [f"{r['backend_s']:.1f}" if r["backend_s"] is not None else "-" for r in runs]
        print(f"| {backend} | {precision} | {second['runs']} | {second['import_s']:.1f} | {first['start_s']:.1f} | "
              f"{part[0]} | {second['start_s']:.1f} | {part[1]} | {'yes' if second['weights_read'] else 'no'} |",
              flush=True)


if __name__ == "__main__":
    main()
