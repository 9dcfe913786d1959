"""The report shows the crop each exemplar class was shown by, and only from the file run.json recorded."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

from conftest import scene
from test_report import _open, browser  # noqa: F401  (browser is a fixture)
from ovdet.report.exemplars import EXEMPLAR_THUMB, exemplar_thumbnails
from ovdet.text.exemplars import Exemplar
from ovdet.weights.registry import DEMO_FILE


def _decoded(uri: str) -> np.ndarray:
    head, data = uri.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)


def test_thumbnail_is_the_recorded_crop_and_only_while_the_file_is_unchanged(tmp_path):
    image = scene(200, 300, seed=3)
    image[50:150, 40:240] = (0, 0, 255)  # the boxed part is plain red
    path = tmp_path / "ref.png"
    cv2.imwrite(str(path), image)
    record = Exemplar(path, box=(40, 50, 240, 150), name="jack").record()
    thumbs = exemplar_thumbnails([record, {**record, "negative": True, "class": None}])
    crop = _decoded(thumbs["jack"][0])
    assert crop.shape == (EXEMPLAR_THUMB // 2, EXEMPLAR_THUMB, 3)  # 200x100 scaled to 64 wide
    assert np.abs(crop.astype(int) - (0, 0, 255)).mean() < 12 and list(thumbs) == ["jack"]
    cv2.imwrite(str(path), 255 - image)  # changed since the run: not shown
    assert exemplar_thumbnails([record]) == {"jack": []}


def test_hostile_records_show_nothing(tmp_path):
    (tmp_path / "secret.txt").write_text("not for the report")
    records = [{"class": "x", "negative": False, "image": "/etc/hostname", "sha256": "0" * 64, "box": None},
               {"class": "x", "negative": False, "image": str(tmp_path / "secret.txt"), "sha256": "0" * 64},
               {"class": "x", "negative": False, "image": str(tmp_path), "sha256": "0" * 64},
               {"class": ["x"], "image": "a.png"}, "junk", None, {"class": "x", "image": 7}]
    assert exemplar_thumbnails(records) == {"x": []}
    assert exemplar_thumbnails("not a list") == {} and exemplar_thumbnails(None) == {}


@pytest.fixture(scope="module")
def exemplar_run(tmp_path_factory):
    """An annotate run (demo model) with a text class and an exemplar class, and its report."""
    if not DEMO_FILE.is_file():
        pytest.skip("the demo model is absent")
    from ovdet.config import DetectorConfig
    from ovdet.jobs.annotate import annotate_folder
    from ovdet.report import write_report

    root = tmp_path_factory.mktemp("exemplar_run")
    src = root / "src"
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f"{i}.png"), scene(160, 160, seed=i))
    ref = root / "ref.png"
    cv2.imwrite(str(ref), scene(160, 160, seed=7))
    annotate_folder(src, ["red circle", Exemplar(ref, box=(10, 10, 60, 50), name="thing")], root / "out",
                    formats="jsonl", config=DetectorConfig(model="demo", device="cpu"), quiet=True)
    return write_report(root / "out", quiet=True)


def test_annotate_report_carries_exemplar_thumbnails(exemplar_run):
    page = exemplar_run.read_text(encoding="utf-8")
    data = json.loads(page.split('<script id="ovdet-data" type="application/json">', 1)[1].split("</script>", 1)[0])
    classes = {c["name"]: c["x"] for c in data["classes"]}
    assert classes["red circle"] == [] and len(classes["thing"]) == 1
    assert _decoded(classes["thing"][0]).shape == (40, 50, 3)  # smaller than a thumbnail: as it is


def test_browser_shows_the_exemplar_thumbnail(browser, exemplar_run):
    _open(browser, exemplar_run)
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#classes img.exemplar'), i => [i.complete, i.naturalWidth])")
    assert shown == [[True, 50]]  # drawn, not blocked by the page's content security policy
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _page_classes(page) -> dict[str, list[str]]:
    text = page.read_text(encoding="utf-8")
    data = json.loads(text.split('<script id="ovdet-data" type="application/json">', 1)[1].split("</script>", 1)[0])
    return {c["name"]: c["x"] for c in data["classes"]}


def test_relabel_moves_the_exemplars_to_the_new_name_and_drops_them_with_their_class(exemplar_run, tmp_path):
    from ovdet.jobs.relabel import relabel_run
    from ovdet.report import write_report

    run = exemplar_run.parent
    old = json.loads((run / "run.json").read_text(encoding="utf-8"))["settings"]
    relabel_run(run, tmp_path / "renamed", rename="thing=widget", quiet=True)
    new = json.loads((tmp_path / "renamed" / "run.json").read_text(encoding="utf-8"))["settings"]
    assert [{**e, "class": "thing"} for e in new["exemplars"]] == old["exemplars"]
    assert [e["class"] for e in new["exemplars"]] == ["widget"]
    assert [c.get("fuse") for c in new["classes"]["classes"]] == [c.get("fuse") for c in old["classes"]["classes"]]
    classes = _page_classes(write_report(tmp_path / "renamed", quiet=True))
    assert "thing" not in classes and len(classes["widget"]) == 1  # the report still shows what it was shown by
    relabel_run(run, tmp_path / "dropped", drop="thing", quiet=True)
    assert json.loads((tmp_path / "dropped" / "run.json").read_text(encoding="utf-8"))["settings"]["exemplars"] == []
