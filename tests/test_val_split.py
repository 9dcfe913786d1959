"""--val-split: a seeded hash split of the YOLO and COCO outputs, the same on re-run and resume, and trainable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.errors import DatasetError, OVDetWarning, ResumeMismatchError
from ovdet.jobs.evaluate import load_dataset
from ovdet.datasets.splits import ValSplit
from test_annotate import CLASSES, FakeDetector, assert_exactly_once, journal, make_images

N = 20


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split") / "src"
    make_images(root, N, size=(64, 64))
    return root


def split_of(out: Path) -> tuple[list[str], list[str]]:
    """The images (paths relative to the input folder) of the train and val lists, via the journal's keys."""
    image_of = {r["key"]: r["image"] for r in journal(out)}
    lists = []
    for name in ("train", "val"):
        lines = (out / "yolo" / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        assert all(line.startswith("./images/") and (out / "yolo" / line).exists() for line in lines)
        lists.append(sorted(image_of[Path(line).stem] for line in lines))
    return lists[0], lists[1]


def coco_split_of(out: Path) -> tuple[list[str], list[str]]:
    files = []
    for name in ("train", "val"):
        coco = json.loads((out / "coco" / f"{name}.json").read_text(encoding="utf-8"))
        ids = {im["id"] for im in coco["images"]}
        assert all(a["image_id"] in ids for a in coco["annotations"])
        files.append(sorted(im["file_name"] for im in coco["images"]))
    return files[0], files[1]


def run(src: Path, out: Path, **kw):
    return annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=3, quiet=True,
                           **kw)


def test_split_is_a_stable_hash_of_the_image_path(src, tmp_path):
    summary = run(src, tmp_path / "a", val_split=0.3)
    train, val = split_of(tmp_path / "a")
    assert sorted(train + val) == sorted(r["image"] for r in journal(tmp_path / "a")) and not set(train) & set(val)
    assert 0 < len(val) < N and summary.split == (len(train), len(val))
    assert summary.line().endswith(f" (split: {len(train)} train / {len(val)} val)")
    assert val == sorted(i for i in train + val if ValSplit(0.3, 0).is_val(i))
    assert coco_split_of(tmp_path / "a") == (train, val)
    data_text = (tmp_path / "a" / "yolo" / "data.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(data_text)
    assert data["train"] == "train.txt" and data["val"] == "val.txt" and "by a hash of their path" in data_text
    coco_all = json.loads((tmp_path / "a" / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert len(coco_all["images"]) == N  # the main COCO file keeps every image
    image_of = {r["key"]: r["image"] for r in journal(tmp_path / "a")}
    for name, images in (("train", train), ("val", val)):  # `ovdet eval` / `ovdet train` read the same splits
        ds = load_dataset(tmp_path / "a" / "yolo" / "data.yaml", split=name)
        assert sorted(image_of[im.path.stem] for im in ds.images) == images

    run(src, tmp_path / "b", val_split=0.3)  # a re-run elsewhere gives the same split
    assert split_of(tmp_path / "b") == (train, val)
    run(src, tmp_path / "c", val_split=0.3, split_seed=1)  # another seed, another split
    assert split_of(tmp_path / "c") != (train, val)
    # an image's split does not depend on which other images exist
    assert all(ValSplit(0.3, 0).is_val(i) == (i in val) for i in train + val)


def test_resume_gives_the_same_split_and_changing_it_needs_overwrite(src, tmp_path):
    run(src, tmp_path / "clean", val_split=0.25)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        annotate_folder(src, CLASSES, out, detector=FakeDetector(fail_after=2), batch=3, quiet=True,
                        val_split=0.25, checkpoint_s=0.0)
    partial_train, partial_val = split_of(out)  # lists hold the journal as of the last checkpoint
    assert 0 < len(partial_train) + len(partial_val) and len(journal(out)) == 6
    summary = run(src, out, val_split=0.25)
    assert summary.images_already_done == 6
    assert split_of(out) == split_of(tmp_path / "clean") and coco_split_of(out) == coco_split_of(tmp_path / "clean")
    assert_exactly_once(out, {r["image"] for r in journal(tmp_path / "clean")})
    with pytest.raises(ResumeMismatchError, match="val_split: 0.25 → 0.5"):
        run(src, out, val_split=0.5)


def test_no_split_says_val_is_train(src, tmp_path):
    summary = run(src, tmp_path / "out")
    text = (tmp_path / "out" / "yolo" / "data.yaml").read_text(encoding="utf-8")
    assert text.startswith("# val = train:") and "--val-split" in text
    data = yaml.safe_load(text)
    assert data["train"] == data["val"] == "images"
    assert not (tmp_path / "out" / "yolo" / "val.txt").exists() and not (tmp_path / "out" / "coco" / "val.json").exists()
    assert summary.split is None and " train / " not in summary.line()


def test_bad_fraction_and_an_empty_split(src, tmp_path, capsys):
    for bad in (-0.1, 1.0):
        with pytest.raises(DatasetError, match="--val-split must be at least 0 and below 1"):
            run(src, tmp_path / "x", val_split=bad)
    with pytest.warns(OVDetWarning, match="the val split is empty"):
        run(src, tmp_path / "tiny", val_split=1e-9)
    assert main(["annotate", str(src), "--classes", "a", "--out", str(tmp_path / "y"), "--val-split", "2"]) == 2
    assert "--val-split must be at least 0" in capsys.readouterr().err


def test_old_runs_without_split_settings_still_resume(src, tmp_path):
    out = tmp_path / "out"
    run(src, out)
    manifest = json.loads((out / "run.json").read_text())
    for key in ("val_split", "split_seed"):
        del manifest["settings"][key]
    (out / "run.json").write_text(json.dumps(manifest))
    assert run(src, out).images_already_done == N


@pytest.mark.filterwarnings("ignore:`get_trial_id`")  # ultralytics' Ray Tune callback, as ray is installed
def test_ultralytics_trains_on_both_splits(src, tmp_path):
    from ultralytics import YOLO

    from ovdet.weights.checkpoint import _quiet_ultralytics

    out = tmp_path / "out"
    run(src, out, val_split=0.3)
    train, val = split_of(out)
    with _quiet_ultralytics():
        model = YOLO("yolov8n.yaml")
        model.train(data=str(out / "yolo" / "data.yaml"), epochs=1, imgsz=64, batch=8, device="cpu", workers=0,
                    plots=False, project=str(tmp_path / "runs"), name="t", exist_ok=True, verbose=False,
                    amp=False, mosaic=0.0)
    trainer = model.trainer
    image_of = {r["key"]: r["image"] for r in journal(out)}
    seen_train = sorted(image_of[Path(f).stem] for f in trainer.train_loader.dataset.im_files)
    seen_val = sorted(image_of[Path(f).stem] for f in trainer.test_loader.dataset.im_files)
    assert (seen_train, seen_val) == (train, val)
    assert sum(len(lb["cls"]) for lb in trainer.test_loader.dataset.labels) > 0  # val labels were found too
    assert "metrics/mAP50(B)" in trainer.metrics
