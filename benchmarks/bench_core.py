"""ovdet detect vs ultralytics YOLOWorld.predict, and set_classes cost, in one process on the same weights.

    python benchmarks/bench_core.py [--runs 20] [--imgsz 640] [--device cpu]

Both sides use the same random-init yolov8s-worldv2 (no pretrained weights can be downloaded here) with the
same 80 text embeddings; speed does not depend on the weights' values. The text tower is a random-init
CLIP ViT-B/32-sized text model (same architecture and cost as the real one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_world_model, save_world_checkpoint, scene  # noqa: E402

from ovdet import OVDetector  # noqa: E402
from ovdet.text.tower import TextEncoder  # noqa: E402

COCO80 = ("person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
          "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
          "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
          "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
          "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
          "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
          "toothbrush").replace("_", "\0").split()
COCO80 = [c.replace("\0", " ") for c in COCO80]


def interleaved_median_ms(fns, runs: int) -> list[float]:
    """Median wall time of each function, calling them in turn so machine load hits all sides alike."""
    times = [[] for _ in fns]
    for i in range(runs):
        for fn, bucket in zip(fns, times):
            t = time.perf_counter()
            fn(i)
            bucket.append((time.perf_counter() - t) * 1000)
    return [statistics.median(b) for b in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed images per side (median reported)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch",
                        help="ovdet's backend (torch: the per-call overhead against ultralytics' torch predict; "
                             "benchmarks/bench_backends.py compares the backends)")
    args = parser.parse_args()
    from ultralytics import YOLOWorld
    from ultralytics.utils import NUM_THREADS

    all_cores = torch.get_num_threads()  # torch's default, which ovdet keeps
    torch.set_num_threads(NUM_THREADS)  # ultralytics predict pins torch to this (cores - 1); same for both sides
    text = TextEncoder.random(seed=0, hidden_size=512, num_hidden_layers=12, num_attention_heads=8)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OVDET_HOME"] = tmp  # a fresh embedding cache, not the user's
        ckpt = Path(tmp) / "yolov8s-worldv2.pt"
        save_world_checkpoint(random_world_model("yolov8s-worldv2.yaml", seed=0), ckpt)
        det = OVDetector(ckpt, text_model=text, device=args.device, imgsz=args.imgsz, backend=args.backend)

        t = time.perf_counter()
        det.set_classes(COCO80)
        first = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        det.set_classes(COCO80)
        second = (time.perf_counter() - t) * 1000
        emb = det.world._txt_feats[0].float().cpu()

        yolo = YOLOWorld(str(ckpt))
        yolo.model.txt_feats = emb[None].clone()
        yolo.model.model[-1].nc = len(COCO80)
        yolo.model.names = dict(enumerate(COCO80))

        images = [scene(720, 1280, seed=i) for i in range(args.runs)]
        ref_kwargs = dict(imgsz=args.imgsz, conf=0.25, iou=0.7, device=args.device, verbose=False)
        yolo.predict(images[0], **ref_kwargs)  # warm-up both sides
        det.detect(images[0])
        batch = [images[i % len(images)] for i in range(8)]
        ref, ours = interleaved_median_ms(
            [lambda i: yolo.predict(images[i], **ref_kwargs), lambda i: det.detect(images[i])], args.runs)

        def with_threads(n, fn):
            torch.set_num_threads(n)
            fn()
            torch.set_num_threads(NUM_THREADS)

        _, ours_all_cores = interleaved_median_ms(
            [lambda i: yolo.predict(images[i], **ref_kwargs),
             lambda i: with_threads(all_cores, lambda: det.detect(images[i]))], args.runs)
        ref_batch, ours_batch = (t / len(batch) for t in interleaved_median_ms(
            [lambda i: yolo.predict(batch, **ref_kwargs), lambda i: det.detect_batch(batch)], max(3, args.runs // 4)))

    print(f"device={det.device} threads={NUM_THREADS} (all cores: {all_cores}) imgsz={args.imgsz} classes=80 "
          f"image=1280x720 runs={args.runs} torch={torch.__version__}")
    print("| measurement | ms | speed vs ultralytics |")
    print("| --- | ---: | ---: |")
    print(f"| ultralytics YOLOWorld.predict, per image | {ref:.1f} | 1.00x |")
    print(f"| ovdet detect, per image, same threads | {ours:.1f} | {ref / ours:.2f}x |")
    print(f"| ovdet detect, per image, torch's default threads ({all_cores}) | {ours_all_cores:.1f} | "
          f"{ref / ours_all_cores:.2f}x |")
    print(f"| ultralytics YOLOWorld.predict on a list of 8, per image | {ref_batch:.1f} | 1.00x |")
    print(f"| ovdet detect_batch (8), per image, same threads | {ours_batch:.1f} | {ref_batch / ours_batch:.2f}x |")
    print(f"| ovdet set_classes, 80 prompts, first call (tower in memory, encodes all) | {first:.1f} | |")
    print(f"| ovdet set_classes, 80 prompts, second call (embedding cache hit) | {second:.1f} | |")


if __name__ == "__main__":
    main()
