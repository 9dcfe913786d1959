"""Model configs and data.yaml files are data: hostile ones run nothing, real ones build what ultralytics builds."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import WorldModel

from conftest import random_world_model, save_world_checkpoint
from ovdet import OVDetector
from ovdet.cli import main
from ovdet.errors import DatasetError, ModelError, OVDetWarning, WeightsUnsafeError
from ovdet.weights.modelconfig import build_world_model, check_model_config, read_model_yaml
from ovdet.jobs.train import OVDetWorldTrainer, prepare_data
from ovdet.model.world import WorldDetector, load_world_checkpoint
from ovdet.weights.checkpoint import _quiet_ultralytics

REAL_CONFIGS = [f"yolov8{size}-{version}.yaml" for version in ("world", "worldv2") for size in "nsmlx"]


def payload(marker: Path) -> str:
    """Python source that leaves a marker file if anything evaluates it."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch() or nn.SiLU()"


def nested_model_config(cfg: dict, marker: Path) -> dict:
    """The attack: a layer "DetectionModel" whose argument "scales" names parse_model's local `scales`, which is a
    whole model config with an `activation` that the nested build evals."""
    cfg = copy.deepcopy(cfg)
    cfg["scales"] = {"n": [0.33, 0.25, 1024], "activation": payload(marker), "nc": 1,
                     "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Conv", [16, 3, 2]]]}
    cfg["backbone"] = [[-1, 1, "DetectionModel", ["scales"]], *cfg["backbone"][1:]]
    return cfg


def packaged(name: str = "yolov8n-worldv2.yaml") -> dict:
    """A real YOLO-World config as a dict (ultralytics' own file)."""
    return read_model_yaml(name)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # key order kept: parse_model picks the first scale
    return path


def test_the_payload_runs_when_ultralytics_builds_the_config_unchecked(tmp_path):
    # the control: the hostile config really runs code in ultralytics; every test below expects it not to
    marker = tmp_path / "fired"
    with _quiet_ultralytics(), contextlib.suppress(Exception):  # it may fail after the payload ran; irrelevant
        WorldModel(nested_model_config(packaged(), marker), verbose=False)
    assert marker.exists()


# ---- door 2a: the .json of a .safetensors pair

def test_safetensors_pair_config_cannot_run_code(tmp_path, capsys):
    pt = tmp_path / "tiny.pt"
    save_world_checkpoint(random_world_model(), pt)
    assert main(["weights", "convert", str(pt), "--out", str(tmp_path / "pair")]) == 0
    weights, config = tmp_path / "pair.safetensors", tmp_path / "pair.json"
    meta = json.loads(config.read_text())
    marker = tmp_path / "fired"
    meta["config"] = nested_model_config(meta["config"], marker)
    config.write_text(json.dumps(meta))
    with pytest.raises(WeightsUnsafeError, match="scales entry 'activation'"):
        load_world_checkpoint(weights)
    capsys.readouterr()
    assert main(["detect", str(tmp_path), "--model", str(weights), "--classes", "a", "--device", "cpu"]) == 2
    assert "scales entry 'activation'" in capsys.readouterr().err
    assert not marker.exists()


# ---- door 2b: a .pt's model.yaml (ovdet train's start model, ovdet weights convert)

@pytest.fixture
def hostile_pt(tmp_path):
    model = random_world_model()
    marker = tmp_path / "fired"
    model.yaml = nested_model_config(model.yaml, marker)
    path = tmp_path / "evil.pt"
    save_world_checkpoint(model, path)
    return path, marker


def test_weights_convert_refuses_a_checkpoint_whose_config_runs_code(hostile_pt, tmp_path, capsys):
    path, marker = hostile_pt
    assert main(["weights", "convert", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "WeightsUnsafe" not in err and "scales entry 'activation'" in err and str(marker) in err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()


def test_train_refuses_a_start_checkpoint_whose_config_runs_code(hostile_pt, tmp_path, capsys):
    path, marker = hostile_pt
    data = synth_dataset(tmp_path / "data")
    code = main(["train", str(data), "--classes-from-data", "--model", str(path), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--epochs", "1"])
    assert code == 2 and "scales entry 'activation'" in capsys.readouterr().err
    assert not marker.exists()
    # the trainer's own builder checks too (what runs if a config reaches it another way)
    trainer = SimpleNamespace(trust_weights=False, args=SimpleNamespace(model=str(path)),
                              data={"channels": 3, "nc": 2})
    with pytest.raises(WeightsUnsafeError, match="scales entry 'activation'"):
        OVDetWorldTrainer.get_model(trainer, cfg=nested_model_config(packaged(), marker), verbose=False)
    evil_yaml = write_yaml(tmp_path / "evil.yaml", nested_model_config(packaged(), marker))
    with pytest.raises(WeightsUnsafeError, match="scales entry 'activation'"):
        OVDetWorldTrainer.get_model(trainer, cfg=str(evil_yaml), verbose=False)
    assert not marker.exists()


# ---- door 2c: a model .yaml given as --model

@pytest.mark.parametrize("attack", ["nested model", "top-level activation"])
def test_model_yaml_cannot_run_code(tmp_path, capsys, attack):
    marker = tmp_path / "fired"
    cfg = packaged()
    if attack == "nested model":
        cfg, expected = nested_model_config(cfg, marker), "scales entry 'activation'"
    else:
        cfg["activation"], expected = payload(marker), "names activation"
    path = write_yaml(tmp_path / "evil.yaml", cfg)
    with pytest.raises(WeightsUnsafeError, match=expected):
        WorldDetector.load(path, device="cpu")
    assert main(["detect", str(tmp_path), "--model", str(path), "--classes", "a", "--device", "cpu"]) == 2
    assert expected in capsys.readouterr().err
    data = synth_dataset(tmp_path / "data")
    assert main(["train", str(data), "--classes-from-data", "--model", str(path), "--out", str(tmp_path / "run"),
                 "--device", "cpu"]) == 2
    assert expected in capsys.readouterr().err
    assert not marker.exists()


# ---- the schema, piece by piece

def _set(path: tuple, value):
    def mutate(cfg):
        target = cfg
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, named", [
    (_set(("backbone", 0, 2), "DetectionModel"), "'DetectionModel'"),
    (_set(("backbone", 0, 2), "TorchVision"), "'TorchVision'"),  # downloads torchvision weights
    (_set(("backbone", 0, 2), "torch_safe_load"), "'torch_safe_load'"),  # a function, unpickles a path
    (_set(("backbone", 0, 2), "torchvision.ops.DeformConv2d"), "torchvision.ops.DeformConv2d"),
    (_set(("backbone", 0, 2), "nn.Bilinear"), "'nn.Bilinear'"),
    (_set(("backbone", 0, 3), ["scales"]), "'scales'"),  # parse_model's locals: the scales table, ...
    (_set(("backbone", 0, 3), ["d"]), "'d'"),  # ... the whole config (a nested build of itself)
    (_set(("backbone", 0, 3), [16, "__import__('os')"]), "__import__"),
    (_set(("backbone", 0, 3), [{"a": 1}]), "{'a': 1}"),
    (_set(("backbone", 0, 3), [10 ** 7, 3, 2]), "10000000"),
    (_set(("backbone", 0, 3), [16, 4000, 2]), "4000"),  # a kernel no config has: gigabytes of weights
    (_set(("head", 0, 3), [None, 64, "nearest"]), "64"),  # an upsample factor that exhausts memory
    (_set(("backbone", 0, 1), 10 ** 6), "1000000 times"),
    (_set(("backbone", 0, 0), "x"), "input 'x'"),
    (_set(("backbone", 0), "Conv"), "malformed layer 0"),
    (_set(("activation",), "nn.SiLU(); import os"), "names activation"),
    (_set(("activation",), "torch.nn.LeakyReLU(__import__('os'))"), "names activation"),
    (_set(("activation",), "nn.Module()"), "names activation"),
    (_set(("activation",), "nn.ReLU(0.5)"), "names activation"),  # an argument only where it is a number
    (_set(("activation",), ["nn.SiLU()"]), "names activation"),
    (_set(("scales", "n"), "x"), "scales entry 'n'"),
    (_set(("scales", "nano"), [0.33, 0.25, 1024]), "scales entry 'nano'"),
    (_set(("scales", "n"), [0.33, 0.25, 10 ** 9]), "scales entry 'n'"),
    (_set(("scale",), "q"), "scale 'q'"),
    (_set(("nc",), "nc"), "nc 'nc'"),
    (_set(("nc",), 10 ** 9), "nc 1000000000"),
    (_set(("kpt_shape",), [17, 3]), "key 'kpt_shape'"),
    (_set(("end2end",), True), "key 'end2end'"),
    (_set(("download",), "x"), "key 'download'"),
])
def test_schema_refuses_anything_outside_it_and_names_it(mutate, named):
    cfg = packaged()
    mutate(cfg)
    with pytest.raises(WeightsUnsafeError) as exc:
        check_model_config(cfg, "cfg.yaml")
    assert named in str(exc.value) and "cfg.yaml" in str(exc.value)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_every_real_world_config_passes_and_builds_the_same_model(name):
    # on the meta device: same layers and parameter shapes as ultralytics' own build, without allocating them
    with _quiet_ultralytics(), torch.device("meta"):
        ours = build_world_model(read_model_yaml(name), name)
        theirs = WorldModel(name, verbose=False)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert ours.yaml["scale"] == theirs.yaml["scale"] == name[6]
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]


def test_activation_is_made_by_ovdet_never_evaluated(tmp_path, monkeypatch):
    from ultralytics.nn import tasks

    cfg = packaged()
    cfg["activation"] = "torch.nn.LeakyReLU(0.125)"
    path = write_yaml(tmp_path / "yolov8n-leaky.yaml", cfg)
    with _quiet_ultralytics():
        theirs = WorldModel(str(path), verbose=False)  # ultralytics evals this (harmless) string itself
    before = Conv.default_act
    monkeypatch.setattr(tasks, "eval", lambda *a: pytest.fail("ultralytics evaluated the activation"),
                        raising=False)
    model = WorldDetector.load(path, device="cpu").model
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert [type(a) for a in acts] == [type(m.act) for m in theirs.modules() if isinstance(m, Conv)]
    leaky = [a for a in acts if isinstance(a, torch.nn.LeakyReLU)]
    assert len(leaky) > len(acts) // 2 and all(a.negative_slope == 0.125 for a in leaky)
    assert Conv.default_act is before  # process-wide state restored
    assert check_model_config(cfg, "x")["activation"] == "nn.LeakyReLU(0.125)"  # canonical: what a checkpoint keeps


def test_model_yaml_urls_and_missing_files_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="URL"):
        read_model_yaml("https://example.com/yolov8s-worldv2.yaml")
    with pytest.raises(ModelError, match="not found"):
        read_model_yaml(tmp_path / "none.yaml")


# ---- door 3: data.yaml

def synth_dataset(root: Path, **fields) -> Path:
    """A one-image YOLO dataset (train split only unless fields add more) and its data.yaml."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return write_yaml(root / "data.yaml", {"train": "images/train", "val": "images/val",
                                           "names": {0: "thing"}, **fields})


def test_data_yaml_download_is_refused_without_trust(tmp_path, capsys):
    marker = tmp_path / "fired"
    data = synth_dataset(tmp_path / "ds", download=f"__import__('pathlib').Path({str(marker)!r}).touch()")
    with pytest.raises(DatasetError, match="'download' field"):
        prepare_data(data, tmp_path / "o1")
    assert main(["train", str(data), "--classes-from-data", "--model", "yolov8n-worldv2.yaml",
                 "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'download' field" in err and "--trust-data" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the control: with trust the file goes to ultralytics as is, which runs the field (val split is missing)
    from ultralytics.data.utils import check_det_dataset

    handed, _ = prepare_data(data, tmp_path / "o2", trust_data=True)
    assert handed == data
    with contextlib.suppress(Exception):  # what ultralytics does after the payload ran is irrelevant
        check_det_dataset(str(handed))
    assert marker.exists()


@pytest.mark.parametrize("fields, named", [
    ({"val": "../elsewhere/images"}, "val entry '../elsewhere/images'"),
    ({"val": "/etc"}, "val entry '/etc'"),
    ({"test": ["images/train", "images/../../x"]}, "test entry 'images/../../x'"),
    ({"path": ".."}, "'path: ..'"),
    ({"path": "/"}, "'path: /'"),
])
def test_data_yaml_splits_must_stay_inside_the_dataset(tmp_path, fields, named):
    data = synth_dataset(tmp_path / "ds", **fields)
    with pytest.raises(DatasetError) as exc:
        prepare_data(data, tmp_path / "out")
    assert named in str(exc.value) and "--trust-data" in str(exc.value)


def test_data_yaml_list_file_lines_must_stay_inside_the_dataset(tmp_path):
    data = synth_dataset(tmp_path / "ds", val="val.txt")
    (tmp_path / "ds" / "val.txt").write_text("./images/train/a.png\n/etc/passwd.png\n")
    with pytest.raises(DatasetError, match="val entry '/etc/passwd.png'"):
        prepare_data(data, tmp_path / "out")


def test_a_clean_data_yaml_is_passed_on_as_checked_data(tmp_path):
    data = synth_dataset(tmp_path / "ds", path=".", roboflow={"url": "https://example.com"})
    (tmp_path / "ds" / "images" / "val").mkdir()
    derived, names = prepare_data(data, tmp_path / "out")
    meta = yaml.safe_load(derived.read_text())
    assert derived == tmp_path / "out" / "data.yaml" and names == ["thing"]
    assert meta == {"path": str(tmp_path / "ds"), "train": "images/train", "val": "images/val",
                    "names": {0: "thing"}}


# ---- 6a: imgsz from a checkpoint, and from the caller

def test_checkpoint_imgsz_beyond_the_cap_falls_back_to_640_without_allocating(tmp_path, monkeypatch,
                                                                             tiny_text_encoder):
    path, model = tmp_path / "big.pt", random_world_model()
    torch.save({"model": model, "train_args": {"imgsz": 40000}}, path)
    sizes = []

    def letterbox(new_shape, **kw):  # records each size; never makes a huge one, even if the cap were broken
        sizes.append(new_shape)
        assert max(new_shape) <= 8192, f"a {new_shape} letterbox would allocate gigabytes"
        return real(new_shape, **kw)

    import ultralytics.data.augment as augment  # the torch backend's letterbox (imported where it is used)

    real = augment.LetterBox
    monkeypatch.setattr(augment, "LetterBox", letterbox)
    with pytest.warns(OVDetWarning, match="imgsz 40000"):
        det = OVDetector(path, text_model=tiny_text_encoder, device="cpu")
    assert det.imgsz == 640
    det.set_classes(["a"])
    det.detect(np.zeros((64, 64, 3), np.uint8))
    assert sizes == [(640, 640)]
    with pytest.raises(ModelError, match="imgsz 40000"):
        det.detect(np.zeros((64, 64, 3), np.uint8), imgsz=40000)
    assert sizes == [(640, 640)]  # refused before a letterbox was made
    from ovdet.model.world import checkpoint_imgsz

    for claimed in ([1280, 40000], "640; x", -1, True):
        with pytest.warns(OVDetWarning, match="imgsz"):
            assert checkpoint_imgsz({"train_args": {"imgsz": claimed}}, path) == 640
    assert checkpoint_imgsz({"train_args": {"imgsz": [1280, 960]}}, path) == 1280
    assert checkpoint_imgsz({"train_args": {}}, path) == checkpoint_imgsz({}, path) == 640


def test_cli_trust_data_reaches_train(monkeypatch, tmp_path):
    import ovdet.jobs.train
    from ovdet.jobs.train import TrainResult

    seen = []
    result = TrainResult(tmp_path / "model.pt", dict.fromkeys(("precision", "recall", "mAP50", "mAP50-95"), 0.0), 1, 0)
    monkeypatch.setattr(ovdet.jobs.train, "train", lambda *a, **kw: seen.append(kw) or result)
    for flags, trusted in (([], False), (["--trust-data"], True)):
        assert main(["train", str(tmp_path), "--classes-from-data", "--quiet", *flags]) == 0
        assert seen.pop()["trust_data"] is trusted
