"""set_classes on the 80 COCO names: cold (fresh process, empty cache), warm (fresh process, cached: no tower
load), warm in-process, a cache miss in a warm process, and ultralytics' own set_classes where it can run.

    python benchmarks/bench_prompts.py [--runs 3] [--device cpu]

The text tower is a random-init CLIP ViT-B/32-sized text model (same architecture and cost as the real one) saved
to a local Hugging Face folder, so its cache identity comes from the folder's files; the detector is a random-init
yolov8s-worldv2 checkpoint. Everything runs under a temporary OVDET_HOME, offline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import COCO80  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from ovdet import OVDetector
from ovdet.detector import OVDetector  # the import itself, not a lazy attribute
t1 = time.perf_counter()
det = OVDetector(sys.argv[1], text_model=sys.argv[2], device=sys.argv[3])
t2 = time.perf_counter()
det.set_classes(json.loads(sys.argv[4]))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "detector_s": t2 - t1, "set_classes_ms": (t3 - t2) * 1000,
                  "tower_loaded": det._text.loaded}))
"""

ULTRALYTICS_CHILD = """
import json, sys, time
from ultralytics import YOLOWorld
model = YOLOWorld(sys.argv[1])
names = json.loads(sys.argv[2])
times = []
for _ in range(2):
    t = time.perf_counter()
    model.set_classes(names)
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps(times))
"""


def run_child(code: str, *args: str) -> tuple[dict | list, float]:
    """Run a fresh Python process; its JSON output and its wall time in seconds (interpreter start included)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                         cwd=ROOT)
    wall = time.perf_counter() - t
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def ultralytics_status() -> str | None:
    """Why ultralytics' set_classes cannot run here, or None when it can."""
    if importlib.util.find_spec("clip") is None:
        return ("not run: YOLOWorld.set_classes encodes with `import clip` (OpenAI's CLIP package, published only "
                "on GitHub); importing ultralytics.nn.text_model without it runs `pip install "
                "git+https://github.com/ultralytics/CLIP.git`, and clip.load then downloads ViT-B-32.pt from "
                "openaipublic. This machine reaches package registries only, ovdet never installs clip, and that "
                "path takes no locally converted text model")
    if not (Path.home() / ".cache" / "clip" / "ViT-B-32.pt").is_file():
        return "not run: clip is installed but ~/.cache/clip/ViT-B-32.pt is missing (it would be downloaded)"
    return None


def fmt_ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ms" if len(values) == 1 else \
        f"{statistics.median(values):.1f} ms (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per cold/warm row (median reported)")
    parser.add_argument("--inproc-runs", type=int, default=50, help="repeated in-process calls (median reported)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OVDET_HOME"] = str(Path(tmp) / "home")  # inherited by the child processes
        os.environ["OVDET_OFFLINE"] = "1"
        import torch

        from conftest import random_world_model, save_world_checkpoint
        from ovdet import OVDetector
        from ovdet.text.cache import EmbeddingCache
        from ovdet.text.tower import TextEncoder

        folder, ckpt = Path(tmp) / "clip-vit-b32-random", Path(tmp) / "yolov8s-worldv2.pt"
        tower = TextEncoder.random(seed=0, hidden_size=512, num_hidden_layers=12, num_attention_heads=8)
        tower.model.save_pretrained(folder)
        save_world_checkpoint(random_world_model("yolov8s-worldv2.yaml", seed=0), ckpt)
        names = json.dumps(COCO80)
        cache = EmbeddingCache()

        cold, warm = [], []
        for _ in range(args.runs):
            cache.clear()  # prompts and file-hash memos: a first run ever
            cold.append(run_child(CHILD, str(ckpt), str(folder), args.device, names))
            warm.append(run_child(CHILD, str(ckpt), str(folder), args.device, names))
        assert all(r["tower_loaded"] for r, _ in cold) and not any(r["tower_loaded"] for r, _ in warm)

        det = OVDetector(ckpt, text_model=folder, device=args.device)
        det.set_classes(COCO80)
        inproc = []
        for _ in range(args.inproc_runs):
            t = time.perf_counter()
            det.set_classes(COCO80)
            inproc.append((time.perf_counter() - t) * 1000)
        encoder = det.text_encoder  # loaded now, for the miss row
        miss, bare = [], []
        for i in range(5):  # interleaved, so that machine load hits both alike
            prompts = [f"{name} {i}" for name in COCO80]  # never seen: encoded and written
            t = time.perf_counter()
            det.set_classes(prompts)
            miss.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            encoder.encode([f"{name} x{i}" for name in COCO80])
            bare.append((time.perf_counter() - t) * 1000)
        info = cache.info()

        status = ultralytics_status()
        ultra = None
        if status is None:
            ultra, _ = run_child(ULTRALYTICS_CHILD, str(ckpt), names)

    def col(rows, key):
        return [r[key] for r, _ in rows]

    print(f"\nset_classes, 80 COCO names, device={args.device}, torch threads={torch.get_num_threads()}, "
          f"text tower: random CLIP ViT-B/32-sized HF folder; {args.runs} fresh processes per row\n")
    print("| case | set_classes | process wall (start→done) | text tower loaded |")
    print("| --- | --- | --- | --- |")
    print(f"| ovdet cold: fresh process, empty cache (tower load + hash + encode 80) | "
          f"{fmt_ms(col(cold, 'set_classes_ms'))} | {statistics.median([w for _, w in cold]):.2f} s | yes |")
    print(f"| ovdet warm: fresh process, cached | {fmt_ms(col(warm, 'set_classes_ms'))} | "
          f"{statistics.median([w for _, w in warm]):.2f} s | no |")
    print(f"| ovdet warm: same process, repeated call ({args.inproc_runs}×) | {fmt_ms(inproc)} | - | - |")
    print(f"| ovdet miss: 80 new prompts, tower already loaded (encode + write) | {fmt_ms(miss)} | - | yes |")
    print(f"| reference: TextEncoder.encode(80 new prompts), no cache | {fmt_ms(bare)} | - | yes |")
    if ultra is not None:
        print(f"| ultralytics YOLOWorld.set_classes, first / second call | {ultra[0]:.1f} ms / {ultra[1]:.1f} ms "
              f"| - | yes (every call) |")
    else:
        print(f"| ultralytics YOLOWorld.set_classes | {status} | - | - |")
    median = statistics.median
    print(f"\nfresh-process breakdown (median, cold / warm): import ovdet {median(col(cold, 'import_s')):.2f} s / "
          f"{median(col(warm, 'import_s')):.2f} s, detector load {median(col(cold, 'detector_s')):.2f} s / "
          f"{median(col(warm, 'detector_s')):.2f} s")
    print(f"cache after the run: {info.entries} entries, {info.bytes / 2**20:.1f} MiB (limit "
          f"{info.max_bytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
