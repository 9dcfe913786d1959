"""annotate --engine ray vs the local engine: images/s on the same folder at the same total torch threads.

    python benchmarks/bench_ray.py [--images 400] [--imgsz 320] [--batch 8] [--repeat 2] [--cpus 2]

One run, same weights (random-init yolov8s-worldv2, class bias set for ~25 boxes per image as in
bench_annotate.py), same 80 class embeddings, same folder of generated 640x480 JPEGs, YOLO + JSONL outputs.
Sides alternate (local, ray, local, ray, ...), each --repeat times, best kept, after one untimed local warm-up run;
Ray's own start (ray.init, the cluster) is outside the timing, its per-run cost (worker processes starting, the
weights shipped, one model built per worker and warmed up on its first batches) inside it.

- local:            annotate_folder(...) in this process, torch at --cpus threads, decode threads as default
- ray, defaults:    ray.init(num_cpus=--cpus); RayEngine() as `--engine ray` runs it: one worker per node holding
                    all of its CPUs (here one worker of --cpus CPUs, --cpus torch threads)
- ray, 1 CPU each:  the same node; --cpus workers of 1 CPU (1 torch thread) each (the default before #23)
- ray, 2 nodes:     ray.cluster_utils.Cluster, two nodes of --cpus/2 CPUs (simulated on this machine: the same
                    cores, the nodes' raylets and object stores on top), at defaults (one worker per node)

Overhead = 1 - ray images/s / local images/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_annotate import NAMES, detector, make_folder, world_checkpoint  # noqa: E402

from ovdet import annotate_folder  # noqa: E402
from ovdet.engines.ray import RayEngine  # noqa: E402


def run_once(det, src: Path, out: Path, args: argparse.Namespace, engine) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = annotate_folder(src, NAMES, out, formats="yolo,jsonl", detector=det, imgsz=args.imgsz, conf=args.conf,
                        batch=args.batch, quiet=True, engine=engine)
    seconds = time.perf_counter() - t
    assert s.images_done == args.images, s
    return args.images / seconds


def compare(det, src: Path, tmp: Path, args: argparse.Namespace, engines: dict[str, object]) -> dict[str, float]:
    """Best images/s of the local engine and of each Ray engine, runs interleaved."""
    best = {"local": 0.0, **{name: 0.0 for name in engines}}
    torch.set_num_threads(args.cpus)
    run_once(det, src, tmp / "out-local", args, "local")  # warm-up: oneDNN picks its kernels on the first calls
    for _ in range(args.repeat):
        torch.set_num_threads(args.cpus)
        best["local"] = max(best["local"], run_once(det, src, tmp / "out-local", args, "local"))
        for name, engine in engines.items():
            best[name] = max(best[name], run_once(det, src, tmp / "out-ray", args, engine))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="total CPUs (torch threads) on every side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", help="the detector's backend on every side")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        src = make_folder(tmp / "images", args.images, 480, 640)
        det = detector(world_checkpoint("yolov8s-worldv2.yaml", tmp / "s.pt"), args, args.imgsz)
        print(f"{args.images} images 640x480, yolov8s-worldv2 at {args.imgsz}, batch {args.batch}, "
              f"{args.cpus} CPUs on every side, best of {args.repeat}")
        rows: list[tuple[str, float, float]] = []

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        one_node = compare(det, src, tmp, args, {
            "ray, 1 node, defaults (1 worker, all CPUs)": RayEngine(),
            f"ray, 1 node, {args.cpus} workers x 1 CPU": RayEngine(workers=args.cpus, cpus_per_worker=1),
        })
        ray.shutdown()
        rows += [(name, ips, one_node["local"]) for name, ips in one_node.items()]

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus // 2, "include_dashboard": False})
        cluster.add_node(num_cpus=args.cpus - args.cpus // 2)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        two_nodes = compare(det, src, tmp, args, {
            "ray, simulated 2 nodes, defaults (1 worker per node)": RayEngine()})
        ray.shutdown()
        cluster.shutdown()
        rows += [(f"{name} (2-node session)" if name == "local" else name, ips, two_nodes["local"])
                 for name, ips in two_nodes.items()]

        print("| engine | images/s | vs local | overhead |")
        print("| --- | ---: | ---: | ---: |")
        for name, ips, local in rows:
            print(f"| {name} | {ips:.2f} | {ips / local:.2f}x | {100 * (1 - ips / local):.0f}% |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
