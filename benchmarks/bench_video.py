"""`ovdet video` (with and without --track) vs ultralytics predict(stream=True) + cv2 writing, one run.

    python benchmarks/bench_video.py [--frames 300] [--imgsz 640] [--device auto] [--batch 4]

Both sides read the same generated 1280x720 video, run the same random-init yolov8s-worldv2 with the same
class embeddings, conf, iou and imgsz, draw the detections and write an mp4v video of the same size and fps.
The confidence threshold is chosen (once, for both sides) so that the first frame has about --boxes detections.
Speed does not depend on the weights' values (no pretrained weights can be downloaded here). End-to-end
frames per second are reported (best of --rounds), model loading and a one-image warm-up excluded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_embeddings, random_world_model, save_world_checkpoint, scene  # noqa: E402

from ovdet import OVDetector  # noqa: E402
from ovdet.video.job import process_video  # noqa: E402

CLASSES = ["person", "car", "bus", "bicycle", "dog", "backpack", "traffic light", "bench", "cup", "phone"]


def make_video(path: Path, frames: int, width: int = 1280, height: int = 720, fps: float = 30.0) -> None:
    """Random shapes on noise with a few bright rectangles moving across."""
    background = scene(height, width, seed=0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for i in range(frames):
        frame = background.copy()
        for k in range(4):
            x = (40 + 9 * i + 300 * k) % (width - 160)
            y = 100 + 130 * k
            cv2.rectangle(frame, (x, y), (x + 120, y + 200), (60 * k, 200, 255 - 50 * k), -1)
        writer.write(frame)
    writer.release()


def run_ultralytics(yolo, video: Path, out: Path, **kwargs) -> tuple[int, float]:
    """The ultralytics way: predict(stream=True), plot each result, write it with cv2."""
    cap = cv2.VideoCapture(str(video))
    fps, size = cap.get(cv2.CAP_PROP_FPS), (int(cap.get(3)), int(cap.get(4)))
    cap.release()
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    start, frames = time.perf_counter(), 0
    for result in yolo.predict(source=str(video), stream=True, verbose=False, **kwargs):
        writer.write(result.plot())
        frames += 1
    writer.release()
    return frames, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="frames of the generated 720p video")
    parser.add_argument("--imgsz", type=int, default=640, help="inference size, both sides")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--backend", default="torch",
                        help="ovdet's backend (torch: the per-call overhead against ultralytics' torch predict; "
                             "benchmarks/bench_backends.py compares the backends)")
    parser.add_argument("--batch", type=int, default=4, help="ovdet video --batch")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all pipelines in turn; report each one's best")
    parser.add_argument("--boxes", type=int, default=20,
                        help="pick the confidence threshold that gives about this many boxes per frame (random "
                             "weights score almost every anchor alike; real scenes have tens of boxes, not 300)")
    args = parser.parse_args()
    from ultralytics import YOLOWorld
    from ultralytics.utils import NUM_THREADS

    all_cores = torch.get_num_threads()  # torch's default, which ovdet keeps when used alone
    torch.set_num_threads(NUM_THREADS)  # ultralytics predict pins torch to this (cores - 1); same for both sides
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video, ckpt = tmp / "in.mp4", tmp / "yolov8s-worldv2.pt"
        make_video(video, args.frames)
        save_world_checkpoint(random_world_model("yolov8s-worldv2.yaml", seed=0), ckpt)
        emb = random_embeddings(len(CLASSES))

        det = OVDetector(ckpt, device=args.device, imgsz=args.imgsz, backend=args.backend)
        det.set_embeddings(CLASSES, emb)
        yolo = YOLOWorld(str(ckpt))
        yolo.model.txt_feats = emb[None].clone()
        yolo.model.model[-1].nc = len(CLASSES)
        yolo.model.names = dict(enumerate(CLASSES))
        device = det.device
        _, first = cv2.VideoCapture(str(video)).read()
        scores = np.sort(det.detect(first, conf=0.001).confidence)[::-1]
        conf = float(scores[min(args.boxes, len(scores)) - 1]) if len(scores) else 0.25
        det.conf = conf
        ref_kwargs = dict(imgsz=args.imgsz, conf=conf, iou=0.7, device=str(device))
        if device.type == "cuda":
            ref_kwargs["half"] = True
        yolo.predict(first, verbose=False, **ref_kwargs)  # warm-up both sides
        mean_dets = np.mean([len(d) for d in det.detect_batch([first] * 2)])

        runs: dict[str, list[tuple[int, float]]] = {}
        for _ in range(args.rounds):  # the pipelines take turns, so changing machine load hits all of them
            name = "ultralytics predict(stream=True) + plot + cv2 write"
            runs.setdefault(name, []).append(run_ultralytics(yolo, video, tmp / "ultralytics.mp4", **ref_kwargs))
            for track in (False, True):
                report = process_video(det, video, tmp / f"ovdet-{track}.mp4", track=track, batch=args.batch,
                                       progress=False)
                name = f"ovdet video{' --track' if track else ''} (batch {args.batch})"
                runs.setdefault(name, []).append((report.frames, report.seconds))
            torch.set_num_threads(all_cores)
            report = process_video(det, video, tmp / "ovdet-all.mp4", batch=args.batch, progress=False)
            torch.set_num_threads(NUM_THREADS)
            name = f"ovdet video (batch {args.batch}), torch's default threads ({all_cores})"
            runs.setdefault(name, []).append((report.frames, report.seconds))
        rows = [(name, *min(times, key=lambda r: r[1])) for name, times in runs.items()]

    ref_fps = rows[0][1] / rows[0][2]
    print(f"device={device} threads={torch.get_num_threads()} imgsz={args.imgsz} classes={len(CLASSES)} "
          f"video=1280x720x{args.frames} rounds={args.rounds} conf={conf:.4f} (~{mean_dets:.0f} boxes/frame) "
          f"torch={torch.__version__}")
    print("| pipeline | frames | s | FPS | vs ultralytics |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, frames, seconds in rows:
        fps = frames / seconds
        print(f"| {name} | {frames} | {seconds:.1f} | {fps:.1f} | {fps / ref_fps:.2f}x |")


if __name__ == "__main__":
    main()
