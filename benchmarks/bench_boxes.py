"""The steps around the forward pass, numpy (ovdet.model.boxes, what OpenVINO and ONNX Runtime run with) against
ultralytics' torch ones (what the torch backend runs), on the same inputs, at the same thread count (torch
and OpenCV).

    python benchmarks/bench_boxes.py [--threads 2] [--runs 200]

Letterbox: one 1280x720 BGR image to a float32 1x3x384x640 batch (ultralytics: LetterBox, then the tensor steps of
WorldDetector.preprocess). NMS: a [1, 84, 8400] head output with 400 boxes over conf 0.25 in clusters, 80 classes
(ultralytics: non_max_suppression with torchvision's NMS). Medians in ms; the outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch
import torchvision  # noqa: F401 - ultralytics' NMS is torchvision's when it is imported (as in its predict)
from ultralytics.data.augment import LetterBox
from ultralytics.utils import nms

from ovdet.model import boxes


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def head_output(seed: int = 0) -> np.ndarray:
    """[1, 4+80, 8400]: 400 boxes in 40 clusters score over 0.25, the rest below."""
    rng = np.random.default_rng(seed)
    preds = np.zeros((1, 84, 8400), np.float32)
    centres = rng.uniform(50, 590, (40, 2))
    preds[0, :2] = rng.uniform(0, 640, (2, 8400))
    preds[0, 2:4] = rng.uniform(10, 120, (2, 8400))
    preds[0, 4:] = rng.uniform(0, 0.2, (80, 8400))
    hits = rng.choice(8400, 400, replace=False)
    preds[0, :2, hits] = (centres[np.arange(400) % 40] + rng.normal(0, 4, (400, 2))).astype(np.float32)
    preds[0, 4 + rng.integers(0, 80, 400), hits] = rng.uniform(0.3, 0.95, 400)
    return preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads of both sides")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)  # both letterboxes resize with OpenCV
    image = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), np.uint8)

    def torch_letterbox() -> torch.Tensor:
        boxed = LetterBox((640, 640), auto=True, stride=32)(image=image)
        return torch.from_numpy(boxed).unsqueeze(0).permute(0, 3, 1, 2).flip(1).float().div_(255)

    preds = head_output()
    assert np.array_equal(boxes.letterbox([image], 640, 32), torch_letterbox().numpy())
    ours = boxes.non_max_suppression(preds, 0.25, 0.7)
    theirs = nms.non_max_suppression(torch.from_numpy(preds), 0.25, 0.7)
    assert np.array_equal(ours[0], theirs[0].numpy())
    rows = [("letterbox 1280x720 -> 384x640", lambda: boxes.letterbox([image], 640, 32), torch_letterbox),
            (f"NMS, {len(ours[0])} kept of 400", lambda: boxes.non_max_suppression(preds, 0.25, 0.7),
             lambda: nms.non_max_suppression(torch.from_numpy(preds), 0.25, 0.7))]
    print(f"torch and OpenCV threads {args.threads} on both sides, median of {args.runs}\n")
    print("| step | ovdet numpy, ms | ultralytics torch, ms | ratio |\n| --- | ---: | ---: | ---: |")
    for label, numpy_fn, torch_fn in rows:
        a, b = median_ms(numpy_fn, args.runs), median_ms(torch_fn, args.runs)
        print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
