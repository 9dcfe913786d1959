"""`ovdet relabel`: equals a fresh annotate run at the new thresholds in every format; clean-ups; clear refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.errors import DatasetError, RelabelError
from ovdet.jobs.relabel import relabel_run
from ovdet.jobs.synth import WorldSpec, generate
from ovdet.weights.registry import DEMO_FILE

CLASSES = ["red circle", "blue square", "green triangle", "red square"]
RUN_CONF = 0.05
NEW_CONF = {"red circle": 0.5, "blue square": 0.3, "green triangle": 0.2}  # "red square" keeps the run's 0.05

needs_demo = pytest.mark.skipif(not DEMO_FILE.is_file(), reason=f"demo model {DEMO_FILE} is absent")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    data = generate(tmp_path_factory.mktemp("world") / "w", train=1, val=10, seed=77, spec=WorldSpec(imgsz=160),
                    progress=False)
    return data.parent / "images" / "val"


@pytest.fixture(scope="module")
def demo():
    from ovdet import OVDetector

    return OVDetector("demo", device="cpu", imgsz=160)


@pytest.fixture(scope="module")
def low_run(images, demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("low") / "run"
    annotate_folder(images, CLASSES, out, detector=demo, conf=RUN_CONF, quiet=True)
    return out


def _tree(root: Path) -> dict[str, object]:
    """Every output file of a run folder, parsed where its content holds paths or ids that differ by design."""
    files: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel == "run.json":
            continue
        if path.is_symlink():
            files[rel] = os.path.realpath(path)
        elif rel == "yolo/data.yaml":
            files[rel] = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "path"}
        elif rel == "coco/annotations.json":
            files[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k != "info"}
        else:
            files[rel] = path.read_bytes()
    return files


@needs_demo
def test_relabel_equals_a_fresh_annotate_run_in_every_format(images, demo, low_run, tmp_path):
    summary = relabel_run(low_run, tmp_path / "relabelled", conf=NEW_CONF, quiet=True)
    assert summary.kept > 0 and summary.dropped > 0  # the thresholds really cut

    class_file = tmp_path / "classes.yaml"
    class_file.write_text(yaml.safe_dump({"classes": [
        {"name": n, "conf": NEW_CONF[n]} if n in NEW_CONF else n for n in CLASSES]}))
    annotate_folder(images, str(class_file), tmp_path / "fresh", detector=demo, conf=RUN_CONF, quiet=True)

    relabelled, fresh = _tree(tmp_path / "relabelled"), _tree(tmp_path / "fresh")
    assert sorted(relabelled) == sorted(fresh)
    assert {"coco/annotations.json", "yolo/data.yaml", "predictions.jsonl"} <= set(fresh)
    assert any(k.startswith("voc/Annotations/") for k in fresh) and any(k.startswith("yolo/labels/") for k in fresh)
    for name in fresh:
        assert relabelled[name] == fresh[name], name


def _write_run(root: Path, records: list[dict], names: list[str], conf: float = 0.2,
               class_conf: dict[str, float] | None = None) -> Path:
    """A hand-made run folder (run.json + predictions.jsonl), as annotate writes them, over the images in ../src."""
    root.mkdir(parents=True)
    class_conf = class_conf or {}
    settings = {"source": str(root.parent / "src"), "classes": {"classes": [{"name": n, "prompts": [n], "conf": class_conf.get(n)}
                                                             for n in names], "negatives": [], "templates": [],
                                                 "reduce": "max"},
                "model": "fake", "conf": conf, "formats": ["coco", "yolo", "voc", "jsonl"]}
    (root / "run.json").write_text(json.dumps({"version": 1, "settings": settings}))
    with open(root / "predictions.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return root


def _record(i: int, dets: list[tuple[int, float, list[float]]], names: list[str], tmp: Path) -> dict:
    image = tmp / "src" / f"im{i}.jpg"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(b"not read by relabel")
    return {"image": image.name, "path": str(image), "key": f"im{i}", "width": 100, "height": 80,
            "detections": [{"class_id": c, "class_name": names[c], "score": s, "bbox": b} for c, s, b in dets]}


@pytest.fixture
def small_run(tmp_path) -> Path:
    names = ["car", "automobile", "tree", "sign"]
    records = [
        _record(0, [(0, 0.9, [0, 0, 50, 40]), (1, 0.35, [10, 10, 20, 20]), (2, 0.6, [1, 1, 3, 3])], names, tmp_path),
        _record(1, [(3, 0.25, [5, 5, 60, 60]), (2, 0.95, [0, 0, 100, 80])], names, tmp_path),
        _record(2, [], names, tmp_path),
    ]
    return _write_run(tmp_path / "run", records, names, conf=0.2, class_conf={"sign": 0.24})


def test_drop_rename_merge_and_min_area_renumber_classes(small_run, tmp_path):
    out = tmp_path / "out"
    summary = relabel_run(small_run, out, conf="car=0.5,automobile=0.3", drop="sign", rename="automobile=car",
                          min_area=10, quiet=True)
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [[(d["class_name"], d["class_id"], d["score"]) for d in r["detections"]] for r in recs] == [
        [("car", 0, 0.9), ("car", 0, 0.35)],  # the tree of area 4 px² is under --min-area
        [("tree", 1, 0.95)],  # sign dropped
        [],
    ]
    assert (summary.images, summary.kept, summary.dropped) == (3, 3, 2)
    assert summary.per_class == {"car": 2, "tree": 1}
    assert yaml.safe_load((out / "yolo" / "data.yaml").read_text())["names"] == {0: "car", 1: "tree"}
    assert (out / "yolo" / "labels" / "im1.txt").read_text() == "1 0.50000 0.50000 1.00000 1.00000\n"
    coco = json.loads((out / "coco" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["car", "tree"]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 1, 2]
    # The new run's floors are its thresholds: relabelling it again cannot go below them.
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["kind"] == "relabel"
    assert [(c["name"], c["conf"]) for c in manifest["settings"]["classes"]["classes"]] == [("car", 0.3),
                                                                                            ("tree", 0.2)]
    with pytest.raises(RelabelError, match=r"car 0.25 < 0.3"):
        relabel_run(out, tmp_path / "again", conf="car=0.25", quiet=True)


def test_default_conf_and_the_runs_own_floors(small_run, tmp_path):
    relabel_run(small_run, tmp_path / "a", default_conf=0.5, quiet=True)
    recs = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert [[d["score"] for d in r["detections"]] for r in recs] == [[0.9, 0.6], [0.95], []]
    # "sign" has its own floor 0.24 (from the class spec), under the run's conf 0.2 elsewhere.
    with pytest.raises(RelabelError, match=r"sign 0.22 < 0.24"):
        relabel_run(small_run, tmp_path / "b", default_conf=0.22, quiet=True)
    relabel_run(small_run, tmp_path / "c", conf="sign=0.24", quiet=True)  # at the floor is fine


@pytest.mark.parametrize("kwargs, match", [
    ({"conf": "bus=0.4"}, r"--conf names 'bus'.*its classes are: car, automobile, tree, sign"),
    ({"conf": "car"}, r"needs the form 'class=value'"),
    ({"conf": "car=high"}, r"not a number"),
    ({"conf": "car=1.5"}, r"not between 0 and 1"),
    ({"drop": "car,automobile,tree,sign"}, r"removes every class"),
    ({"rename": "bus=car"}, r"--rename names 'bus'"),
    ({"min_area": -1}, r"--min-area"),
    ({"formats": "coco,png"}, r"unknown output format 'png'"),
])
def test_bad_options_are_clear_errors(small_run, tmp_path, kwargs, match):
    with pytest.raises((RelabelError, DatasetError), match=match):
        relabel_run(small_run, tmp_path / "out", quiet=True, **kwargs)
    assert not (tmp_path / "out").exists()  # nothing written before the options are checked


def test_output_folder_rules(small_run, tmp_path):
    with pytest.raises(DatasetError, match="the run folder itself"):
        relabel_run(small_run, small_run, quiet=True)
    with pytest.raises(DatasetError, match="not an ovdet run folder"):
        relabel_run(tmp_path, tmp_path / "out", quiet=True)
    relabel_run(small_run, tmp_path / "out", quiet=True, formats="yolo")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.jsonl", "predictions.jsonl", "run.json",
                                                                    "yolo"]
    with pytest.raises(DatasetError, match="--overwrite"):
        relabel_run(small_run, tmp_path / "out", quiet=True)
    relabel_run(small_run, tmp_path / "out", quiet=True, overwrite=True)
    assert (tmp_path / "out" / "coco" / "annotations.json").exists()  # the run's own formats by default
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="holds no ovdet run"):
        relabel_run(small_run, tmp_path / "other", quiet=True, overwrite=True)


def test_cli_prints_errors_without_traceback_and_a_summary(small_run, tmp_path, capsys):
    assert main(["relabel", str(small_run), "--out", str(tmp_path / "x"), "--conf", "car=0.1"]) == 2
    err = capsys.readouterr().err
    assert "ovdet: error: thresholds below the run's own (car 0.1 < 0.2)" in err and "Traceback" not in err
    assert main(["relabel", str(small_run), "--out", str(tmp_path / "y"), "--conf", "car=0.95",
                 "--drop-class", "tree", "--quiet"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "y" / "predictions.jsonl").read_text().splitlines()]
    assert [len(r["detections"]) for r in recs] == [1, 1, 0]
    assert np.isclose(recs[0]["detections"][0]["score"], 0.35)
