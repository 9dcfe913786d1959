"""ovdet.jobs.train / `ovdet train`: ultralytics' trainer with ovdet's text tower, checkpoints OVDetector loads."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from ovdet import OVDetector
from ovdet.weights.checkpoint import ALLOWED_GLOBALS, load_checkpoint, pickle_globals
from ovdet.cli import main
from ovdet.errors import DatasetError
from ovdet.jobs.synth import WorldSpec, generate
from ovdet.text.tower import TextEncoder
from ovdet.jobs.train import prepare_data
from ovdet.model.world import load_world_checkpoint
from ovdet.weights.checkpoint import TEXT_ENCODER_KEY


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return generate(root / "data", train=16, val=8, seed=0, spec=WorldSpec(imgsz=128), progress=False)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A small random CLIP text tower saved as a Hugging Face folder (what --text-model accepts)."""
    folder = tmp_path_factory.mktemp("tower") / "tiny-clip-text"
    TextEncoder.random(seed=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_world, text_folder, tmp_path_factory):
    """`ovdet train` for 2 epochs from a yaml config (scratch) on CPU; ultralytics' CLIP path must not be used."""
    from ultralytics.nn.tasks import WorldModel

    def no_clip(*args, **kwargs):
        raise AssertionError("ultralytics' own CLIP text path was used")

    mp = pytest.MonkeyPatch()
    mp.setattr(WorldModel, "get_text_pe", no_clip)
    mp.setenv("OVDET_OFFLINE", "1")
    out = tmp_path_factory.mktemp("runs") / "scratch"
    try:
        code = main(["train", str(tiny_world), "--classes-from-data", "--model", "yolov8n-worldv2.yaml",
                     "--epochs", "2", "--imgsz", "128", "--batch", "8", "--device", "cpu", "--out", str(out),
                     "--text-model", str(text_folder), "--workers", "0"])
    finally:
        mp.undo()
    assert code == 0
    return out


def test_cli_train_writes_a_checkpoint_with_our_text_embeddings(trained, tiny_world, text_folder):
    # what `ovdet train` writes (and ultralytics' own files beside it) loads with nothing outside the allowlist
    for path in (trained / "model.pt", trained / "weights" / "best.pt", trained / "weights" / "last.pt"):
        assert pickle_globals(path) <= ALLOWED_GLOBALS
    model, ckpt = load_world_checkpoint(trained / "model.pt")
    names = list(yaml.safe_load(tiny_world.read_text())["names"].values())
    assert list(model.names.values()) == names
    state = ckpt[TEXT_ENCODER_KEY]
    assert all(v.dtype == torch.float16 for v in state["state_dict"].values() if v.is_floating_point())
    stored = TextEncoder.from_state(state)
    # the class embeddings the model was validated and saved with come from this very tower
    torch.testing.assert_close(model.txt_feats[0].float(), stored.encode(names), atol=1e-6, rtol=0)
    # ... which is the --text-model tower (up to fp16 storage)
    original = TextEncoder.load(text_folder)
    torch.testing.assert_close(stored.encode(names), original.encode(names), atol=5e-3, rtol=0)
    assert (trained / "results.csv").is_file() and (trained / "weights" / "best.pt").is_file()


def test_trained_checkpoint_loads_in_ovdetector(trained, tiny_world):
    det = OVDetector(trained / "model.pt", device="cpu", imgsz=128)
    det.set_classes(["red circle", "blue square"])
    assert det.text_encoder.dim == 512
    image = cv2.imread(str(next((tiny_world.parent / "images" / "val").glob("*.png"))))
    dets = det.detect(image, conf=0.0, max_det=50)
    assert 0 < len(dets) <= 50  # a barely trained head still ranks boxes: the plumbing works end to end
    assert set(dets.data["class_name"]) <= {"red circle", "blue square"}
    assert (dets.xyxy >= -1).all() and (dets.xyxy <= 129).all()


def test_cli_prints_a_final_metrics_line(trained, capsys, tiny_world):
    # a second, 1-epoch run that fine-tunes the first checkpoint and reuses the tower it carries
    out = trained.parent / "finetune"
    code = main(["train", str(tiny_world), "--classes", ",".join(
                 f"a {n}" for n in yaml.safe_load(tiny_world.read_text())["names"].values()),
                 "--model", str(trained / "model.pt"), "--epochs", "1", "--imgsz", "128", "--batch", "8",
                 "--device", "cpu", "--out", str(out), "--workers", "0", "--set", "mosaic=0.0"])
    assert code == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err  # not a terminal: ultralytics' bars print plain lines
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith("ovdet train: 1 epochs") and "mAP50" in line and str(out / "model.pt") in line
    model, ckpt = load_world_checkpoint(out / "model.pt")
    assert model.names[0] == "a red circle"
    first = load_checkpoint(trained / "model.pt")[TEXT_ENCODER_KEY]
    for key, value in first["state_dict"].items():
        assert torch.equal(ckpt[TEXT_ENCODER_KEY]["state_dict"][key], value)
    assert ckpt["train_args"]["mosaic"] == 0.0


def test_refuses_non_empty_output(trained, tiny_world, capsys):
    code = main(["train", str(tiny_world), "--classes-from-data", "--model", "yolov8n-worldv2.yaml",
                 "--out", str(trained), "--device", "cpu"])
    assert code == 2
    assert "not empty" in capsys.readouterr().err


def test_prepare_data_renames_and_converts_coco(tmp_path, tiny_world):
    data, names = prepare_data(tiny_world, tmp_path / "o1")
    # a data.yaml goes to ultralytics as checked data: its own keys only (synth's record dropped), root absolute
    assert data == tmp_path / "o1" / "data.yaml" and names[0] == "red circle"
    original = yaml.safe_load(tiny_world.read_text())
    assert yaml.safe_load(data.read_text()) == {"path": str(tiny_world.parent), "train": original["train"],
                                                "val": original["val"], "names": original["names"]}
    assert prepare_data(tiny_world, tmp_path / "o1t", trust_data=True)[0] == tiny_world  # --trust-data: as is
    with pytest.raises(DatasetError, match="one per class"):
        prepare_data(tiny_world, tmp_path / "o2", classes=["x", "y"])
    renamed, names = prepare_data(tiny_world, tmp_path / "o3", classes=[f"c{i}" for i in range(9)])
    meta = yaml.safe_load(renamed.read_text())
    assert meta["names"][4] == "c4" and meta["path"] == str(tiny_world.parent)

    coco_dir = tmp_path / "coco"
    coco_dir.mkdir()
    cv2.imwrite(str(coco_dir / "a.png"), np.zeros((50, 100, 3), np.uint8))
    (coco_dir / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200,
                         "iscrowd": 0}],
        "categories": [{"id": 7, "name": "widget"}]}))
    converted, names = prepare_data(coco_dir / "ann.json", tmp_path / "o4")
    assert names == ["widget"]
    from ultralytics.data.utils import check_det_dataset

    info = check_det_dataset(str(converted))
    assert info["names"] == {0: "widget"}
    label = next((tmp_path / "o4" / "data" / "train" / "labels").glob("*.txt")).read_text().split()
    assert label[0] == "0"
    np.testing.assert_allclose([float(v) for v in label[1:]], [0.2, 0.2, 0.2, 0.2], atol=1e-6)


def test_unknown_ultralytics_setting_is_rejected(tiny_world, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tiny_world), "--classes-from-data", "--set", "learning_rate=0.1"])
    assert exc.value.code == 2
    assert "not an ultralytics training argument" in capsys.readouterr().err
