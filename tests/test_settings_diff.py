"""A resume refused for other settings says in one readable line what differs and what to do."""

from __future__ import annotations

import pytest

from ovdet import annotate_folder
from ovdet.errors import ResumeMismatchError
from ovdet.runs.settings_diff import describe_changes
from ovdet.text.prompts import parse_classes
from test_annotate import FakeDetector, make_images


def spec(classes: list[str]) -> dict:
    return parse_classes(classes).record()


def test_class_names_are_listed_in_order():
    assert describe_changes({"classes": spec(["red circle", "blue square"])}, {"classes": spec(["red circle"])}) \
        == ["classes differ: red circle, blue square → red circle"]


def test_same_names_other_phrasings_or_negatives():
    assert describe_changes({"classes": spec(["car|auto", "dog"])}, {"classes": spec(["car", "dog"])}) \
        == ["phrasings or thresholds differ for: car"]
    assert describe_changes({"classes": spec(["car"])}, {"classes": spec(["car", "!truck"])}) \
        == ["negatives: none → truck"]


def test_scalars_lists_and_missing_values():
    old = {"conf": 0.25, "formats": ["coco", "yolo"], "masks": "grabcut", "recursive": True, "imgsz": 640}
    new = {"conf": 0.5, "formats": ["coco"], "masks": None, "recursive": False, "imgsz": 640, "tile": {"size": 640}}
    assert describe_changes(old, new) == ["conf: 0.25 → 0.5", "formats: coco,yolo → coco", "masks: grabcut → none",
                                          "recursive: yes → no", "tile: none → size=640"]


def test_exemplars_by_count_then_by_class():
    a = {"class": "zorblax", "sha256": "1", "box": [0, 0, 8, 8]}
    assert describe_changes({"exemplars": []}, {"exemplars": [a]}) == ["exemplars: 0 → 1"]
    assert describe_changes({"exemplars": [a]}, {"exemplars": [{**a, "box": [1, 1, 9, 9]}]}) \
        == ["exemplars differ for: zorblax (images, boxes or weights)"]


def test_a_hostile_recorded_value_is_shown_escaped_and_bounded():
    (phrase,) = describe_changes({"model": "\x1b]0;pwned\x07" + "x" * 500}, {"model": "demo"})
    assert "\x1b" not in phrase and "\\x1b" in phrase and len(phrase) < 120
    (phrase,) = describe_changes({"classes": {"classes": "not a list"}}, {"classes": spec(["a"])})
    assert phrase == "classes differ: none → a"


def test_the_refusal_is_one_line_that_names_the_change_and_the_ways_out(tmp_path):
    src, out = tmp_path / "src", tmp_path / "labels"
    make_images(src, 2)
    annotate_folder(src, ["red circle", "blue square"], out, detector=FakeDetector(), quiet=True)
    with pytest.raises(ResumeMismatchError) as info:
        annotate_folder(src, ["red circle"], out, detector=FakeDetector(), conf=0.5, quiet=True)
    message = str(info.value)
    assert "\n" not in message and "{" not in message and "'" not in message
    assert "classes differ: red circle, blue square → red circle; conf: 0.25 → 0.5." in message
    assert "--overwrite" in message and "another --out folder" in message
