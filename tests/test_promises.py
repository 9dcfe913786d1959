"""What the README and `--help` promise, checked through the `ovdet` command on the demo model and the sample shapes.

Each test is written so that it fails when its promise breaks: the expected values are worked out here from the
documented rule or from a second run, never by calling the code under test.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import outline_difference
from ovdet.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CLASSES = "red circle,blue square,green triangle"
DEMO = ["--model", "demo", "--device", "cpu", "--classes", CLASSES]


def annotate(src: Path, out: Path, *extra: str) -> None:
    assert main(["annotate", str(src), "--out", str(out), *DEMO, "--format", "yolo,coco", "--quiet", *extra]) == 0


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def splits(out: Path) -> dict[str, str]:
    """image (path under the input folder) -> "train" or "val", read from yolo/train.txt and yolo/val.txt; checked to
    agree with coco/train.json and coco/val.json."""
    image_of = {r["key"]: r["image"] for r in journal(out)}
    yolo = {}
    for name in ("train", "val"):
        for line in (out / "yolo" / f"{name}.txt").read_text(encoding="utf-8").splitlines():
            yolo[image_of[Path(line).stem]] = name
    coco = {}
    for name in ("train", "val"):
        document = json.loads((out / "coco" / f"{name}.json").read_text(encoding="utf-8"))
        coco.update({im["file_name"]: name for im in document["images"]})
    assert yolo == coco and sorted(yolo) == sorted(image_of.values())  # every image in exactly one split, in both formats
    return yolo


def documented_split(image: str, fraction: float, seed: int) -> str:
    """The split rule as ovdet.datasets.splits defines it: an 8-byte BLAKE2b of "SEED\\0PATH" (PATH relative to the
    input folder, POSIX separators), read big-endian, below fraction * 2**64 means val. Pinned here because a run
    made by one version is resumed and relabelled by later ones: the rule must not drift."""
    digest = hashlib.blake2b(f"{seed}\0{image}".encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < fraction * 2.0**64 else "train"


def fill(folder: Path, names: list[str]) -> None:
    """Sample shape images (320x320, a few shapes each) under the given relative names."""
    shapes = sorted((SAMPLES / "shapes").glob("*.jpg")) + [SAMPLES / "shapes.jpg"]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shapes[i % len(shapes)], folder / name)


# ----------------------------------------------------------------------------- annotate


def test_an_images_split_depends_only_on_its_own_path(tmp_path):
    """README: "An image's split is a hash of its path ... so it never changes on a re-run, after a resume, or when
    images are added." Run A, then A with images added between and before its own (in sorted order), then A's top
    level only (--no-recursive): every image of A keeps its split, and the split is the documented hash."""
    first = [f"pic{i:02d}.jpg" for i in range(0, 20, 2)] + ["sub/deep0.jpg", "sub/deep2.jpg"]
    added = [f"pic{i:02d}.jpg" for i in range(1, 20, 2)] + ["000first.jpg", "sub/deep1.jpg", "zz/last.jpg"]
    a, b = tmp_path / "a", tmp_path / "b"
    fill(a, first)
    fill(b, first + added)

    annotate(a, tmp_path / "out-a", "--val-split", "0.4")
    split_a = splits(tmp_path / "out-a")
    assert sorted(split_a) == sorted(first)  # recursive by default: sub/ is included
    assert set(split_a.values()) == {"train", "val"}  # both splits used, so the comparisons below can fail
    assert split_a == {image: documented_split(image, 0.4, 0) for image in first}

    annotate(b, tmp_path / "out-b", "--val-split", "0.4")
    split_b = splits(tmp_path / "out-b")
    assert {image: split_b[image] for image in first} == split_a
    assert split_b == {image: documented_split(image, 0.4, 0) for image in first + added}

    annotate(a, tmp_path / "out-top", "--val-split", "0.4", "--no-recursive")
    split_top = splits(tmp_path / "out-top")
    assert sorted(split_top) == sorted(i for i in first if "/" not in i)  # --no-recursive: the folder itself only
    assert split_top == {image: split_a[image] for image in split_top}

    annotate(a, tmp_path / "out-seed", "--val-split", "0.4", "--split-seed", "7")
    split_seed = splits(tmp_path / "out-seed")
    assert split_seed == {image: documented_split(image, 0.4, 7) for image in first} and split_seed != split_a


def test_no_recursive_leaves_subfolders_out_of_every_output(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    fill(src, ["a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpg"])
    assert main(["annotate", str(src), "--out", str(out), *DEMO, "--quiet", "--no-recursive"]) == 0
    assert sorted(r["image"] for r in journal(out)) == ["a.jpg", "b.png"]
    assert sorted(p.name for p in (out / "yolo" / "images").iterdir()) == ["a.jpg", "b.png"]
    assert sorted(p.stem for p in (out / "voc" / "Annotations").iterdir()) == ["a", "b"]
    coco = json.loads((out / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert sorted(im["file_name"] for im in coco["images"]) == ["a.jpg", "b.png"]


def test_save_annotated_draws_every_box_and_is_off_by_default(tmp_path):
    """--save-annotated: "also write preview JPEGs with boxes to OUT/annotated"; without it, no previews."""
    src = tmp_path / "src"
    fill(src, ["one.jpg", "two.jpg", "sub/three.jpg"])
    annotate(src, tmp_path / "plain")
    assert not (tmp_path / "plain" / "annotated").exists()

    out = tmp_path / "previews"
    annotate(src, out, "--save-annotated")
    records = journal(out)
    assert sorted(p.name for p in (out / "annotated").iterdir()) == sorted(f"{r['key']}.jpg" for r in records)
    boxes = 0
    for rec in records:
        preview = cv2.imread(str(out / "annotated" / f"{rec['key']}.jpg"))
        plain = cv2.imdecode(cv2.imencode(".jpg", cv2.imread(rec["path"]), [cv2.IMWRITE_JPEG_QUALITY, 90])[1],
                             cv2.IMREAD_COLOR)
        assert preview.shape == plain.shape
        for d in rec["detections"]:
            assert outline_difference(preview, plain, d["bbox"]) > 20, (rec["image"], d)
            boxes += 1
    assert boxes >= 3  # the demo model finds the sample shapes, so the check above ran


# ----------------------------------------------------------------------------- webcam --timeout


class StallingCamera:
    """cv2.VideoCapture stand-in for a camera that delivers three frames and then hangs inside read()."""

    def __init__(self):
        self.frames = 3
        self.stalled_at: float | None = None
        self.unstick = threading.Event()

    def __call__(self, *args, **kwargs) -> StallingCamera:
        return self

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if self.frames:
            self.frames -= 1
            return True, np.zeros((96, 128, 3), np.uint8)
        self.stalled_at = time.monotonic()
        self.unstick.wait(60)
        return False, None

    def release(self) -> None:
        pass


def test_webcam_timeout_ends_a_stalled_source_after_that_many_seconds(monkeypatch, capsys):
    """README: a camera "that never delivers a frame fails after --timeout seconds instead of hanging"."""
    camera = StallingCamera()
    monkeypatch.setattr(cv2, "VideoCapture", camera)
    try:
        code = main(["webcam", "--source", "0", "--no-window", "--timeout", "0.5", *DEMO])
        ended = time.monotonic()
    finally:
        camera.unstick.set()
    captured = capsys.readouterr()
    assert code == 2 and "no frame for 0.5 s" in captured.err
    assert re.search(r"^frame \d+:", captured.out, re.M)  # it ran (a live source may skip to the newest frame)
    assert camera.stalled_at is not None and 0.45 <= ended - camera.stalled_at < 5  # the default is 10 s


# ----------------------------------------------------------------------------- OVDET_EMBEDDING_CACHE_MB


def cached_entries(home: Path) -> list[Path]:
    """The embedding cache's entries, by its documented layout: $OVDET_HOME/embeddings/prompts/<tower>/*.emb."""
    return sorted((home / "embeddings" / "prompts").glob("*/*.emb"))


def test_embedding_cache_size_limit_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    """README: the cache is "128 MB by default, OVDET_EMBEDDING_CACHE_MB to change it"."""
    prompts = ",".join(f"shape number {i}" for i in range(12))
    home = tmp_path / "home"
    monkeypatch.setenv("OVDET_HOME", str(home))
    assert main(["classes", "encode", prompts, "--model", "demo", "--device", "cpu"]) == 0
    assert len(cached_entries(home)) == 12  # the default limit holds them all
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    assert "in 12 entries (limit 128.0 MiB" in capsys.readouterr().out

    small = tmp_path / "small"
    monkeypatch.setenv("OVDET_HOME", str(small))
    monkeypatch.setenv("OVDET_EMBEDDING_CACHE_MB", "0.02")  # 20.5 KiB: room for a few of the ~2.1 KB entries
    assert main(["classes", "encode", prompts, "--model", "demo", "--device", "cpu"]) == 0
    entries = cached_entries(small)
    assert 0 < len(entries) < 12
    assert sum(p.stat().st_blocks * 512 for p in entries) <= 0.02 * 2**20
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    assert re.search(rf"in {len(entries)} entries \(limit 20\.5 KiB, set with OVDET_EMBEDDING_CACHE_MB\)",
                     capsys.readouterr().out)

    monkeypatch.setenv("OVDET_EMBEDDING_CACHE_MB", "lots")
    assert main(["cache", "info"]) == 2
    assert "OVDET_EMBEDDING_CACHE_MB='lots' is not a number" in capsys.readouterr().err
