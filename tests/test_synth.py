"""ovdet.jobs.synth: seeded, valid YOLO datasets of coloured shapes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml

from ovdet.cli import main
from ovdet.errors import DatasetError
from ovdet.jobs.evaluate import load_dataset
from ovdet.jobs.synth import PALETTE, WorldSpec, generate, image_rng, render


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_dataset_other_seed_other(tmp_path):
    a = generate(tmp_path / "a", train=5, val=3, seed=7, progress=False).parent
    b = generate(tmp_path / "b", train=5, val=3, seed=7, progress=False).parent
    c = generate(tmp_path / "c", train=5, val=3, seed=8, progress=False).parent
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)


def test_val_split_does_not_depend_on_train_size(tmp_path):
    a = generate(tmp_path / "a", train=2, val=3, seed=1, progress=False).parent
    b = generate(tmp_path / "b", train=6, val=3, seed=1, progress=False).parent
    for sub in ("images/val", "labels/val"):
        assert _files(a / sub) == _files(b / sub)
    assert _files(a / "images/train") != _files(a / "images/val")


def test_layout_and_labels_are_valid_yolo(tmp_path):
    data = generate(tmp_path / "d", train=6, val=4, seed=0, progress=False)
    meta = yaml.safe_load(data.read_text())
    assert meta["train"] == "images/train" and meta["val"] == "images/val"
    assert list(meta["names"].values()) == [f"{c} {s}" for c in ("red", "green", "blue")
                                            for s in ("circle", "square", "triangle")]
    for split, n in (("train", 6), ("val", 4)):
        ds = load_dataset(data, split=split)
        assert len(ds.images) == n
        for image in ds.images:
            img = cv2.imread(str(image.path))
            assert img.shape == (160, 160, 3)
            assert 2 <= len(image.class_ids) <= 6
            assert (image.boxes[:, :2] - image.boxes[:, 2:] / 2 >= 0).all()
            assert (image.boxes[:, :2] + image.boxes[:, 2:] / 2 <= 1 + 1e-6).all()


def test_ultralytics_accepts_the_dataset(tmp_path):
    from ultralytics.data.utils import check_det_dataset

    data = generate(tmp_path / "d", train=2, val=2, seed=0, progress=False)
    info = check_det_dataset(str(data))
    assert info["nc"] == 9 and info["names"][0] == "red circle"
    assert info["val"] == str(tmp_path / "d" / "images" / "val")


@pytest.mark.parametrize("index", range(6))
def test_objects_have_their_colour_sizes_and_little_overlap(index):
    spec = WorldSpec(imgsz=192)
    img, boxes, class_ids = render(image_rng(3, "train", index), spec)
    assert len(boxes) == len(class_ids) >= spec.objects[0]
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (sides >= spec.size[0] * spec.imgsz * 0.9 - 2).all() and (sides <= spec.size[1] * spec.imgsz * 1.3 + 2).all()
    for i, (box, cid) in enumerate(zip(boxes, class_ids)):
        colour, shape = spec.names[cid].split()
        others = [b for j, b in enumerate(boxes) if j != i]
        for other in others:  # shared area is a small part of the smaller box
            iw = min(box[2], other[2]) - max(box[0], other[0])
            ih = min(box[3], other[3]) - max(box[1], other[1])
            if iw > 0 and ih > 0:
                smaller = min(np.prod(box[2:] - box[:2]), np.prod(other[2:] - other[:2]))
                assert iw * ih / smaller <= spec.max_overlap + 1e-6
        if shape in ("circle", "square"):  # the box centre shows the object's colour (up to jitter and noise)
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            patch = np.median(img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3), axis=0)
            nearest = min(PALETTE, key=lambda c: np.abs(np.array(PALETTE[c]) - patch).sum())
            assert nearest == colour


def test_clutter_never_uses_vocabulary_colours():
    spec = WorldSpec(colours=("red", "yellow"), shapes=("star",))
    assert spec.names == ["red star", "yellow star"]
    for colour in (PALETTE["red"], PALETTE["yellow"]):
        assert colour not in spec.distractor_colours


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="Unknown colour"):
        WorldSpec(colours=("red", "chartreuse"))
    with pytest.raises(DatasetError, match="Unknown shape"):
        WorldSpec(shapes=("hexagon",))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        generate(tmp_path / "full", train=1, val=1, progress=False)


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "world"
    code = main(["synth", str(out), "--train", "3", "--val", "2", "--imgsz", "96", "--seed", "4",
                 "--colours", "red,blue", "--shapes", "circle,square"])
    assert code == 0
    captured = capsys.readouterr()
    assert "4 classes" in captured.out
    assert "\r" not in captured.err and "synth train: 3/3 (100%) in " in captured.err
    ds = load_dataset(out / "data.yaml", split="val")
    assert ds.names == ["red circle", "red square", "blue circle", "blue square"]
    assert cv2.imread(str(ds.images[0].path)).shape == (96, 96, 3)
    assert main(["synth", str(out), "--train", "1"]) == 2  # not empty: a clear error, exit code 2
