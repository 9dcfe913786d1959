"""--exemplar on the commands: detect, annotate (run.json records the set, resume refuses another), eval."""

from __future__ import annotations

import json

import cv2
import pytest

from ovdet.cli import _common, main
from ovdet.jobs.synth import WorldSpec, generate, image_rng, render
from ovdet.text.exemplars import EXEMPLAR_SOURCES
from ovdet.util.hashing import file_sha256
from ovdet.weights.registry import DEMO_FILE

pytestmark = pytest.mark.skipif(not DEMO_FILE.is_file(), reason="the demo model is absent")
NAMES = WorldSpec().names
SEED = 3141  # a synth world the demo never saw


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A reference image and the box of a blue circle in it (the CLI form x1,y1,x2,y2)."""
    for index in range(20):
        image, boxes, ids = render(image_rng(SEED, "train", index), WorldSpec())
        circles = [b for b, c in zip(boxes, ids) if NAMES[c] == "blue circle"]
        if circles:
            path = tmp_path_factory.mktemp("ref") / "ref.png"
            cv2.imwrite(str(path), image)
            return path, ",".join(str(int(round(v))) for v in circles[0])
    raise AssertionError("no blue circle in 20 images")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("world") / "w", train=1, val=6, seed=SEED, progress=False)


def test_sources_agree_with_the_exemplar_type():
    assert _common.EXEMPLAR_SOURCES == EXEMPLAR_SOURCES


def test_detect_with_an_exemplar_class(ref, data, capsys):
    path, box = ref
    image = data.parent / "images" / "val" / "000000.png"
    assert main(["detect", str(image), "--model", "demo", "--exemplar", f"zorblax={path}@{box}", "--json"]) == 0
    out = capsys.readouterr().out
    assert "zorblax" in out


def test_nothing_to_find_is_a_clear_error(data, capsys):
    assert main(["detect", str(data.parent / "images" / "val" / "000000.png"), "--model", "demo"]) == 2
    assert "--classes" in capsys.readouterr().err


def test_bad_exemplar_is_a_clear_error(ref, data, capsys):
    path, _ = ref
    image = str(data.parent / "images" / "val" / "000000.png")
    assert main(["detect", image, "--model", "demo", "--exemplar", f"jack={path}@5,5,5,9"]) == 2
    err = capsys.readouterr().err
    assert "'jack'" in err and "zero area" in err
    assert main(["detect", image, "--model", "demo", "--exemplar", "jack=nowhere.png"]) == 2
    assert "nowhere.png does not exist" in capsys.readouterr().err


def test_annotate_records_the_exemplar_set_and_resume_refuses_another(ref, data, tmp_path, capsys):
    path, box = ref
    src, out = data.parent / "images" / "val", tmp_path / "out"
    args = ["annotate", str(src), "--out", str(out), "--model", "demo", "--format", "jsonl", "--quiet",
            "--classes", "red circle"]
    assert main(args + ["--exemplar", f"zorblax={path}@{box}", "--exemplar", f"!={path}@0,0,8,8"]) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    positive, negative = settings["exemplars"]
    assert positive["sha256"] == file_sha256(path) and positive["box"] == [float(v) for v in box.split(",")]
    assert (positive["class"], positive["source"], positive["negative"]) == ("zorblax", "region", False)
    assert negative["negative"] and negative["class"] is None
    assert [c["name"] for c in settings["classes"]["classes"]] == ["red circle", "zorblax"]
    names = {json.loads(line)["image"]: json.loads(line) for line in (out / "predictions.jsonl").open()}
    assert any(d["class_name"] == "zorblax" for record in names.values() for d in record["detections"])
    assert main(args + ["--exemplar", f"zorblax={path}@{box}", "--exemplar", f"!={path}@0,0,8,8"]) == 0  # resumes
    moved = ",".join(str(int(v) + 1) for v in box.split(","))
    capsys.readouterr()
    assert main(args + ["--exemplar", f"zorblax={path}@{moved}", "--exemplar", f"!={path}@0,0,8,8"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "exemplars" in err and "--overwrite" in err
    assert main(args) == 2  # no exemplars at all: another set too
    assert "exemplars" in capsys.readouterr().err


def test_eval_scores_a_class_shown_by_example(ref, data, capsys):
    path, box = ref
    assert main(["eval", str(data), "--model", "demo", "--quiet", "--json", "--classes", "red circle",
                 "--map", "blue circle=zorblax", "--exemplar", f"zorblax={path}@{box}"]) == 0
    result = json.loads(capsys.readouterr().out)
    scores = {c["name"]: c for c in result["classes"]}
    assert set(scores) == {"red circle", "zorblax"} and scores["zorblax"]["dataset_classes"] == ["blue circle"]
    assert scores["zorblax"]["ap50"] > 0.5


def test_classes_encode_writes_exemplar_rows(ref, tmp_path, capsys):
    import shutil

    import numpy as np

    from ovdet import OVDetector

    path, box = ref
    shutil.copy(path, tmp_path / "ref.png")
    spec = tmp_path / "classes.yaml"
    spec.write_text(f"classes:\n  - red circle\n  - name: zorblax\n    prompts: []\n"
                    f"    exemplars: ['ref.png@{box}']\n")
    assert main(["classes", "encode", str(spec)]) == 2
    assert "add --model" in capsys.readouterr().err
    rows = tmp_path / "rows.npy"
    assert main(["classes", "encode", str(spec), "--model", "demo", "--save", str(rows)]) == 0
    assert "1 exemplar(s) embedded" in capsys.readouterr().out
    det = OVDetector("demo", backend="torch")
    det.set_classes(spec)
    np.testing.assert_allclose(np.load(rows), det.world._txt_feats[0].float().numpy(), atol=1e-6)
