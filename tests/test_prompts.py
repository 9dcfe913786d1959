"""Class specifications: inline syntax, class files and their errors, and how synonyms, per-class thresholds,
negatives and templates change detections (checked against a reference computed from the same raw scores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ultralytics.utils import nms, ops

from conftest import random_embeddings, scene
from ovdet.errors import ClassSpecError
from ovdet.text.prompts import DEFAULT_TEMPLATES, ClassEntry, ClassSpec, parse_classes

IMAGE = scene(120, 160, seed=1)
EMB_SEED = 4  # with IMAGE, these random embeddings give the tiny detector boxes of all three classes

FULL_YAML = """\
reduce: mean
templates: ["a photo of a {}", "{}"]
negatives: [reflection, "!poster"]
classes:
  - person|man|woman
  - "!mirror image"
  - name: helmet
    synonyms: [hard hat]
    conf: 0.1
  - name: hardhat2
    prompts: [construction helmet]
  - bicycle: {conf: 0.4}
  - car:
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- parsing

def test_inline_synonyms_and_negatives():
    spec = parse_classes(["person|man | woman", "bus", "!reflection|poster"])
    assert spec.names == ["person", "bus"]
    assert spec.classes[0] == ClassEntry("person", ("person", "man", "woman"))
    assert spec.negatives == ("reflection", "poster")
    assert spec.columns == [("person", 0), ("man", 0), ("woman", 0), ("bus", 1), ("reflection", -1), ("poster", -1)]
    assert not spec.is_plain and spec.reduce == "max" and spec.templates == ()
    assert parse_classes("cat|kitten, !toy cat").names == ["cat"]  # comma strings take the same syntax


def test_plain_list_is_plain():
    spec = parse_classes([" person", "bus "])
    assert spec == ClassSpec.from_names(["person", "bus"]) and spec.is_plain
    assert spec.texts() == ["person", "bus"]


def test_yaml_file(tmp_path):
    spec = parse_classes(write(tmp_path, "classes.yaml", FULL_YAML))
    assert spec.names == ["person", "helmet", "hardhat2", "bicycle", "car"]
    assert [c.prompts for c in spec.classes] == [("person", "man", "woman"), ("helmet", "hard hat"),
                                                ("construction helmet",), ("bicycle",), ("car",)]
    assert spec.thresholds == [None, 0.1, None, 0.4, None]
    assert spec.negatives == ("mirror image", "reflection", "poster")
    assert spec.templates == ("a photo of a {}", "{}") and spec.reduce == "mean"
    assert spec.texts()[:3] == ["a photo of a person", "person", "a photo of a man"]
    assert len(spec.texts()) == 2 * len(spec.columns)


def test_json_file_and_mapping_form_equal_yaml(tmp_path):
    doc = {"classes": {"person": {"synonyms": ["man"]}, "helmet": {"conf": 0.1}, "car": None},
           "negatives": ["reflection"], "templates": True}
    from_json = parse_classes(write(tmp_path, "c.json", json.dumps(doc)))
    yaml_text = ("classes:\n  person: {synonyms: [man]}\n  helmet: {conf: 0.1}\n  car:\n"
                 "negatives: [reflection]\ntemplates: true\n")
    from_yaml = parse_classes(str(write(tmp_path, "c.yml", yaml_text)))
    assert from_json == from_yaml == parse_classes(doc)
    assert from_json.names == ["person", "helmet", "car"] and from_json.templates == DEFAULT_TEMPLATES


def test_top_level_list_file_and_overrides(tmp_path):
    path = write(tmp_path, "list.yaml", "- cat|kitten\n- dog\n")
    spec = parse_classes(path, templates=["a {} photo"], reduce="mean")
    assert spec.names == ["cat", "dog"] and spec.templates == ("a {} photo",) and spec.reduce == "mean"
    assert parse_classes(spec, templates=False).templates == ()


@pytest.mark.parametrize("text, line, message", [
    ("classes:\n  - person\n  - name: helmet\n    conff: 0.1\n", 4, "unknown key 'conff': did you mean 'conf'"),
    ("classes: [a]\ntemplate: ['{}']\n", 2, "unknown key 'template': did you mean 'templates'"),
    ("classes:\n  - person\n  - 'a||b'\n", 3, "empty synonym"),
    ("classes:\n  - person|\n", 2, "empty synonym"),
    ("negatives: [glass]\nclasses:\n  - '!reflection'\n", 2, "only negative prompts"),
    ("classes:\n  - person\n  - bus\n  - ' Person'\n", 4, r"'Person' is listed twice \(as 'person' \(line 2\)"),
    ("classes:\n  - person|man\n  - name: guy\n    synonyms: [MAN]\n", 3, "'MAN' of class 'guy' is also used"),
    ("negatives: [person]\nclasses: [person]\n", 1, "also used by class 'person'"),
    ("classes:\n  car: null\n  car: {conf: 1}\n", 3, "key 'car' appears twice"),
    ("classes:\n  - name: helmet\n    conf: 1.5\n", 3, "conf must be a number between 0 and 1"),
    ("classes: [a]\ntemplates: ['a photo of a']\n", 2, "must contain '{}' exactly once"),
    ("classes: [a]\nreduce: median\n", 2, "reduce must be one of max, mean"),
    ("classes:\n  - !reflection\n", 2, "quote negative prompts"),
    ("classes:\n  - [a, b\n", 3, "not valid YAML"),
    ("classes:\n  - {nmae: helmet, conf: 0.1}\n", 2, "needs a 'name' key"),
    ("classes:\n  - name: 'a|b'\n", 2, "inline syntax inside a mapping"),
    ("classes:\n  - helmet: [hard hat]\n", 2, "must be a mapping"),
    ("classes: []\n", 1, "empty"),
    ("nothing: here\n", 1, "unknown key 'nothing'"),
])
def test_yaml_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ClassSpecError, match=message) as info:
        parse_classes(path)
    assert str(info.value).startswith(f"{path}:{line}")


@pytest.mark.parametrize("text, message", [
    ('{"classes": ["a",\n "b"\n "c"]}', r"c\.json:3: not valid JSON"),
    ('{"classes": [{"name": "a", "cnf": 1}]}', r"c\.json at classes\[0\]\.cnf: unknown key 'cnf'"),
    ('{"classes": ["a"], "classes": ["b"]}', "appears twice"),
    ('"person"', "a list of classes or a mapping"),
])
def test_json_errors(tmp_path, text, message):
    with pytest.raises(ClassSpecError, match=message):
        parse_classes(write(tmp_path, "c.json", text))


def test_specs_built_in_code_are_checked_too():
    with pytest.raises(ClassSpecError, match="listed twice"):
        parse_classes(ClassSpec((ClassEntry("car", ("car",)), ClassEntry("Car", ("auto",)))))
    with pytest.raises(ClassSpecError, match="conf must be"):
        parse_classes(ClassSpec((ClassEntry("car", ("car",), conf=2.0),)))
    with pytest.raises(ClassSpecError, match="empty"):
        parse_classes(ClassSpec(()))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ClassSpecError, match="does not exist"):
        parse_classes(str(tmp_path / "nope.yaml"))
    with pytest.raises(ClassSpecError, match=".yaml, .yml or .json"):
        parse_classes(write(tmp_path, "classes.txt", "a\n"))


@pytest.mark.parametrize("classes, message", [
    (["!reflection"], "only negative prompts"),
    (["person", "a|"], r"class list at \[1\]: 'a\|' has an empty synonym"),
    (["!"], "negative prompt is blank"),
    (["person", "man|person"], "phrasing 'person' of class 'man' is also used by class 'person'"),
    (["person", "Person|man"], "listed twice"),
    ([{"name": "a", "conf": "high"}], "conf must be a number"),
    (42, "list of strings"),
])
def test_list_errors(classes, message):
    with pytest.raises(ClassSpecError, match=message):
        parse_classes(classes)


# ---------------------------------------------------------------- detection semantics

def detect_with_raw(det, monkeypatch, **kwargs):
    """det.detect(IMAGE), plus the raw head output [4+K, A] it scored and the letterboxed size."""
    seen = {}
    real = det.world.model.predict

    def spy(batch, **kw):
        out = real(batch, **kw)
        seen["preds"], seen["shape"] = out[0][0].clone(), batch.shape[2:]
        return out

    with monkeypatch.context() as patch:
        patch.setattr(det.world.model, "predict", spy)
        dets = det.detect(IMAGE, **kwargs)
    return dets, seen


def reference(seen, class_scores, conf, iou=0.7):
    """Ultralytics NMS on class scores that the test derives itself from the raw rows, boxes in image pixels."""
    preds = seen["preds"]
    scores = torch.cat((preds[:4], class_scores(preds[4:])))[None]
    out = nms.non_max_suppression(scores, conf, iou, max_det=1000)[0]
    out[:, :4] = ops.scale_boxes(seen["shape"], out[:, :4], IMAGE.shape)
    return out.numpy()


def assert_same(dets, ref):
    order = np.lexsort((dets.class_id, dets.confidence, *dets.xyxy.T[::-1]))
    order_ref = np.lexsort((ref[:, 5], ref[:, 4], *ref[:, :4].T[::-1]))
    assert len(dets) == len(ref)
    np.testing.assert_allclose(dets.xyxy[order], ref[order_ref, :4], atol=1e-4)
    np.testing.assert_allclose(dets.confidence[order], ref[order_ref, 4], atol=1e-6)
    np.testing.assert_array_equal(dets.class_id[order], ref[order_ref, 5].astype(int))


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_synonyms_score_one_class(tiny_detector, monkeypatch, reduce):
    spec = parse_classes(["alpha|beta", "gamma"], reduce=reduce)
    tiny_detector.set_embeddings(spec, random_embeddings(3, seed=EMB_SEED))
    dets, seen = detect_with_raw(tiny_detector, monkeypatch, conf=0.05, max_det=1000)
    combine = torch.maximum if reduce == "max" else (lambda a, b: (a + b) / 2)
    ref = reference(seen, lambda s: torch.stack((combine(s[0], s[1]), s[2])), conf=0.05)
    assert_same(dets, ref)
    assert tiny_detector.classes == ["alpha", "gamma"] and set(dets.class_id) == {0, 1}
    assert list(dets.data["class_name"]) == [["alpha", "gamma"][i] for i in dets.class_id]


def test_per_class_thresholds_override_global_conf(tiny_detector):
    emb = random_embeddings(3, seed=EMB_SEED)
    tiny_detector.set_embeddings(["a", "b", "c"], emb)
    everything = tiny_detector.detect(IMAGE, conf=0.01, max_det=1000)
    a_scores = np.sort(everything.confidence[everything.class_id == 0])
    b_scores = everything.confidence[everything.class_id == 1]
    high = float(a_scores[len(a_scores) // 2])  # keeps the upper half of class a
    glob = float(b_scores.max() + 0.01)  # the global conf alone would drop every b box
    spec = parse_classes({"classes": [{"name": "a", "conf": high}, {"name": "b", "conf": 0.01}, "c"]})
    tiny_detector.set_embeddings(spec, emb)
    dets = tiny_detector.detect(IMAGE, conf=glob, max_det=1000)
    # Thresholds act before NMS, but a box below its class threshold can only suppress lower-scored boxes of its
    # own class, which are below the same threshold: so the result is the unthresholded one, filtered per class.
    limit = np.array([high, 0.01, glob])[everything.class_id]
    keep = everything.confidence > limit
    np.testing.assert_array_equal(np.sort(dets.confidence), np.sort(everything.confidence[keep]))
    np.testing.assert_array_equal(np.bincount(dets.class_id, minlength=3),
                                  np.bincount(everything.class_id[keep], minlength=3))
    assert 0 < (dets.class_id == 0).sum() < len(a_scores)
    assert (dets.class_id == 1).sum() == len(b_scores)  # b's own threshold (0.01) beats the global one


def test_negatives_drop_boxes_they_win(tiny_detector, monkeypatch):
    emb = random_embeddings(3, seed=EMB_SEED)
    spec = parse_classes(["a", "b", "c", "!not a"])
    tiny_detector.set_embeddings(spec, torch.cat((emb, emb[:1])))  # the negative reuses class a's embedding
    real = tiny_detector.world.model.predict

    def negative_equals_a(batch, **kw):  # make the tie exact (BLAS may differ by an ulp between equal rows)
        out = real(batch, **kw)
        out[0][:, 7] = out[0][:, 4]
        return out

    with monkeypatch.context() as patch:
        patch.setattr(tiny_detector.world.model, "predict", negative_equals_a)
        dets, seen = detect_with_raw(tiny_detector, monkeypatch, conf=0.01, max_det=1000)
    ref = reference(seen, lambda s: s[:3].masked_fill(s[3] >= s[:3].amax(0), 0), conf=0.01)
    assert_same(dets, ref)
    assert 0 not in dets.class_id  # wherever a was the best class, the (equal) negative wins
    tiny_detector.set_embeddings(["a", "b", "c"], emb)
    plain = tiny_detector.detect(IMAGE, conf=0.01, max_det=1000)
    assert (plain.class_id == 0).sum() > 0
    np.testing.assert_allclose(np.sort(dets.confidence), np.sort(plain.confidence[plain.class_id != 0]), atol=1e-6)


def test_class_scores_on_exact_numbers(tiny_detector):
    """The reduction itself: rows → classes (max or mean), negatives win ties, per-class thresholds."""
    world = tiny_detector.world
    emb = random_embeddings(4)
    rows = torch.tensor([[0.2, 0.9, 0.5, 0.3],    # class 0, phrasing 1
                         [0.6, 0.1, 0.5, 0.2],    # class 0, phrasing 2
                         [0.3, 0.45, 0.7, 0.35],  # class 1
                         [0.1, 0.2, 0.7, 0.1]])   # negative: ties the best row at anchor 2
    preds = torch.cat((torch.ones(4, 4), rows))[None]
    world.set_text_embeddings(emb, columns=[0, 0, 1, -1], reduce="max")
    scores, conf = world.class_scores(preds, 0.25)
    assert torch.equal(scores[0, 4:], torch.tensor([[0.6, 0.9, 0.0, 0.3], [0.3, 0.45, 0.0, 0.35]])) and conf == 0.25
    world.set_text_embeddings(emb, columns=[0, 0, 1, -1], reduce="mean")
    scores, _ = world.class_scores(preds, 0.25)
    assert torch.allclose(scores[0, 4:], torch.tensor([[0.4, 0.5, 0.0, 0.25], [0.3, 0.45, 0.0, 0.35]]))
    # Thresholds apply to each anchor's best class: anchor 0 (class 0 at 0.4 <= 0.45) goes; anchor 3 stays
    # (class 1 at 0.35 > 0.2) although its class-0 score is below class 0's threshold.
    scores, conf = world.class_scores(preds, 0.25, class_conf=[0.45, 0.2])
    assert conf == 0.2
    assert torch.allclose(scores[0, 4:], torch.tensor([[0.0, 0.5, 0.0, 0.25], [0.0, 0.45, 0.0, 0.35]]))


# ---------------------------------------------------------------- through set_classes and the text tower

def test_set_classes_with_synonyms_and_templates(tiny_detector, tiny_text_encoder):
    templates = ["a photo of a {}", "{} in the wild"]
    tiny_detector.set_classes(["red circle|round thing", "blue square"], templates=templates)
    assert tiny_detector.classes == ["red circle", "blue square"]
    rows = []
    for phrasing in ("red circle", "round thing", "blue square"):
        emb = tiny_text_encoder.encode([t.format(phrasing) for t in templates])
        rows.append(F.normalize(emb.mean(0), dim=-1))
    np.testing.assert_allclose(tiny_detector.world._txt_feats[0].numpy(), torch.stack(rows).numpy(), atol=1e-6)
    dets = tiny_detector.detect(IMAGE, conf=0.01)
    assert len(dets) > 0 and set(dets.data["class_name"]) <= {"red circle", "blue square"}


def test_class_file_keeps_user_names_and_order(tiny_detector, tmp_path):
    path = write(tmp_path, "classes.yaml", "classes:\n  - zebra\n  - apple|fruit\n  - name: mango\n"
                                           "    prompts: [ripe mango]\n    conf: 0.02\n")
    tiny_detector.set_classes(path)
    assert tiny_detector.classes == ["zebra", "apple", "mango"]
    assert tiny_detector.class_spec.thresholds == [None, None, 0.02]
    tiny_detector.set_classes(str(path))  # a path given as a string works the same
    dets = tiny_detector.detect(IMAGE, conf=0.01)
    assert len(dets) > 0
    assert all(tiny_detector.classes[c] == n for c, n in zip(dets.class_id, dets.data["class_name"]))


def test_plain_lists_keep_plain_scoring(tiny_detector):
    tiny_detector.set_classes(["red circle", "blue square"])
    assert tiny_detector.world._columns is None and tiny_detector.world.num_classes == 2
    tiny_detector.set_classes(["red circle|disc", "!blue square"])
    assert tiny_detector.world._columns.tolist() == [0, 0, -1] and tiny_detector.world.num_classes == 1


def test_refused_spec_leaves_classes_unchanged(tiny_detector):
    tiny_detector.set_classes(["red circle"])
    with pytest.raises(ClassSpecError, match="only negative"):
        tiny_detector.set_classes(["!red circle"])
    assert tiny_detector.classes == ["red circle"]
    with pytest.raises(ClassSpecError, match="2 phrasings"):
        tiny_detector.set_embeddings(parse_classes(["a|b"]), random_embeddings(3))
