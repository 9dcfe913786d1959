"""Rebuild samples/: generated shape images and video for the demo model, and copies of licensed photos.

    python scripts/make_samples.py                  # shapes.jpg, shapes/*.jpg, shapes.mp4 (seeded, no network)
    python scripts/make_samples.py --photos DIR...  # also copy the photos from unpacked package folders

The photos come from files that ship inside registry packages (see samples/README.md for licences).
`--photos` takes the site-packages (or unpacked wheel) folders that hold `skimage/` and `ultralytics/`,
e.g. after `pip download scikit-image==0.26.0 --no-deps` and `python -m zipfile -e scikit_image-*.whl sk`:
`--photos sk /path/to/site-packages`. Every copy is checked against the sha256 recorded below.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
from pathlib import Path

import cv2
import numpy as np

from ovdet.jobs.synth import PALETTE, WorldSpec, render

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

# sample name -> (path inside site-packages, sha256 of the file as shipped). Versions: samples/README.md.
PHOTOS = {
    "bus.jpg": ("ultralytics/assets/bus.jpg",
                "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63"),
    "chelsea.png": ("skimage/data/chelsea.png",
                    "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee.png": ("skimage/data/coffee.png",
                   "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "astronaut.png": ("skimage/data/astronaut.png",
                      "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "rocket.jpg": ("skimage/data/rocket.jpg",
                   "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
}

HEADLINE = ("red circle", "blue square", "green triangle")  # classes the README and notebook look for
VIDEO_SIZE = (320, 240)  # width, height
VIDEO_FRAMES = 64
VIDEO_FPS = 16


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_photos(roots: list[Path]) -> None:
    """Copy each photo from the first root that has it, refusing a file whose hash differs from the record."""
    for name, (rel, digest) in PHOTOS.items():
        found = [root / rel for root in roots if (root / rel).is_file()]
        if not found:
            raise SystemExit(f"{rel} not found under {', '.join(map(str, roots))}")
        if sha256(found[0]) != digest:
            raise SystemExit(f"{found[0]} differs from the recorded file (sha256 {digest}); wrong package version?")
        shutil.copyfile(found[0], SAMPLES / name)
        print(f"copied {found[0]} -> samples/{name}")


def make_images() -> None:
    """shapes.jpg and shapes/shape_N.jpg: 320x320 scenes from ovdet.jobs.synth (the demo model's world), seeded.

    shapes.jpg is the first scene (seeds [7, k], k = 0, 1, ...) that holds all of HEADLINE; the folder gets the
    first four other scenes.
    """
    spec = WorldSpec(imgsz=320, objects=(3, 6))
    scenes = [render(np.random.default_rng([7, k]), spec) for k in range(20)]
    wanted = {spec.names.index(name) for name in HEADLINE}
    hero = next(k for k, (_, _, ids) in enumerate(scenes) if wanted <= set(ids.tolist()))
    folder = SAMPLES / "shapes"
    folder.mkdir(exist_ok=True)
    others = [k for k in range(len(scenes)) if k != hero][:4]
    targets = [(SAMPLES / "shapes.jpg", hero)] + [(folder / f"shape_{i}.jpg", k) for i, k in enumerate(others, 1)]
    for path, k in targets:
        cv2.imwrite(str(path), scenes[k][0], [cv2.IMWRITE_JPEG_QUALITY, 92])
        print(f"wrote samples/{path.relative_to(SAMPLES).as_posix()} (seed [7, {k}])")


def _triangle(cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    theta = angle + np.deg2rad([90, 210, 330])
    return np.round(np.stack([cx + r * np.cos(theta), cy - r * np.sin(theta)], axis=1)).astype(np.int32)


def make_video() -> None:
    """shapes.mp4: a red circle, a blue square and a green triangle moving over a still, cluttered backdrop."""
    w, h = VIDEO_SIZE
    rng = np.random.default_rng(11)
    ramp = np.linspace(110, 170, w, dtype=np.float32)
    backdrop = np.repeat(np.repeat(ramp[None, :, None], h, axis=0), 3, axis=2).astype(np.uint8)
    for _ in range(6):  # distractors in colours outside the demo vocabulary
        colour = PALETTE[str(rng.choice(["yellow", "purple", "brown"]))]
        p1, p2 = rng.integers(0, [w, h], size=(2, 2))
        cv2.line(backdrop, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), colour, 2, cv2.LINE_AA)
    path = SAMPLES / "shapes.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (w, h))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write mp4v video here")
    for t in range(VIDEO_FRAMES):
        s = t / (VIDEO_FRAMES - 1)
        frame = backdrop.copy()
        cv2.circle(frame, (int(40 + 240 * s), 70), 24, PALETTE["red"], -1, cv2.LINE_AA)
        x, y = int(250 - 180 * s), int(120 + 50 * math.sin(2 * math.pi * s))
        cv2.rectangle(frame, (x - 22, y - 22), (x + 22, y + 22), PALETTE["blue"], -1, cv2.LINE_AA)
        cv2.fillPoly(frame, [_triangle(60 + 200 * s, 200 - 20 * s, 26, 2 * math.pi * s)], PALETTE["green"],
                     cv2.LINE_AA)
        writer.write(frame)
    writer.release()
    print(f"wrote samples/shapes.mp4 ({VIDEO_FRAMES} frames, {w}x{h}, {VIDEO_FPS} fps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", nargs="+", type=Path, metavar="DIR",
                        help="folders holding skimage/ and ultralytics/ to copy the photos from")
    args = parser.parse_args()
    SAMPLES.mkdir(exist_ok=True)
    if args.photos:
        copy_photos(args.photos)
    make_images()
    make_video()


if __name__ == "__main__":
    main()
