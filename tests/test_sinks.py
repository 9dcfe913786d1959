"""ovdet.sinks: atomic files, the JSONL journal, and each dataset format parsed back by its own tools."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import supervision as sv
import yaml

from ovdet.errors import DatasetError
from ovdet.sinks import (
    CocoWriter,
    ImageRecord,
    Journal,
    PreviewWriter,
    VocWriter,
    YoloWriter,
    atomic_link,
    atomic_write,
    read_journal,
    remove_stale_temp_files,
    repair_journal,
)

CLASSES = ["red backpack", "chat noir ü", "交通 灯"]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".ovdet-tmp")]


# ------------------------------------------------------------------ atomic files


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, '{"a": 1}')
    atomic_write(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert no_temp_files(tmp_path)


def test_atomic_write_crash_leaves_old_file_intact(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, '{"old": true}')
    with mock.patch("ovdet.sinks.os.replace", side_effect=OSError("simulated crash")), pytest.raises(OSError):
        atomic_write(path, '{"new": tr')
    assert json.loads(path.read_text()) == {"old": True}
    assert no_temp_files(tmp_path)  # a failed write removes its temporary file at once
    (tmp_path / ".f.json.123.ovdet-tmp").write_text('{"new": tr')  # what a kill -9 mid-write leaves
    assert remove_stale_temp_files(tmp_path) == 1
    assert no_temp_files(tmp_path) and path.exists()


def test_atomic_link_points_to_target_and_can_be_replaced(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    link = tmp_path / "out" / "x.jpg"
    link.parent.mkdir()
    atomic_link(a, link)
    assert link.read_bytes() == b"A"
    atomic_link(b, link)
    assert link.read_bytes() == b"B"
    assert no_temp_files(tmp_path)


# ------------------------------------------------------------------ journal


def test_journal_appends_whole_lines_and_reads_them_back(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        for i in range(3):
            j.append({"i": i, "name": CLASSES[i]})
        j.sync()
        size = j.size()
    assert size == path.stat().st_size
    assert [r["name"] for r in read_journal(path)] == CLASSES
    first = len(path.read_bytes().split(b"\n")[0]) + 1
    assert [r["i"] for r in read_journal(path, end=first)] == [0]


@pytest.mark.parametrize("tail", [b'{"i": 3, "na', b'{"i": 3, "na\n', b"\x00\x00\x00"])
def test_repair_cuts_a_torn_last_line(tmp_path, tail):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        for i in range(3):
            j.append({"i": i})
    good = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(tail)
    assert repair_journal(path) == 3
    assert path.read_bytes() == good
    with Journal(path) as j:  # appending after repair continues cleanly
        j.append({"i": 3})
    assert [r["i"] for r in read_journal(path)] == [0, 1, 2, 3]


def test_damage_before_the_last_line_is_refused(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1, broken\n{"i": 2}\n')
    with pytest.raises(DatasetError, match="line 2 is damaged.*--overwrite"):
        repair_journal(path)


def test_repair_of_missing_journal(tmp_path):
    assert repair_journal(tmp_path / "none.jsonl") == 0


# ------------------------------------------------------------------ records and formats


def make_record(tmp_path: Path, name: str = "img.jpg", key: str = "img", seed: int = 0) -> ImageRecord:
    h, w = 60, 80
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    dets = sv.Detections(
        xyxy=np.array([[10.123, 5.5, 40.0, 30.25], [0.0, 0.0, 80.0, 60.0], [-3.0, 50.0, 90.0, 70.0]], np.float32),
        confidence=np.array([0.91234567, 0.5, 0.051], np.float32),
        class_id=np.array([0, 2, 1]),
    )
    return ImageRecord.from_detections(name, str(path), key, img.shape, dets)


def test_record_rounds_clips_and_round_trips_json(tmp_path):
    rec = make_record(tmp_path)
    assert rec.width == 80 and rec.height == 60
    assert rec.boxes.tolist()[0] == [10.12, 5.5, 40.0, 30.25]
    assert rec.boxes.tolist()[2] == [0.0, 50.0, 80.0, 60.0]  # clipped to the image
    d = rec.to_json(CLASSES)
    assert [x["class_name"] for x in d["detections"]] == ["red backpack", "交通 灯", "chat noir ü"]
    assert d["detections"][0]["score"] == 0.91235
    back = ImageRecord.from_json(json.loads(json.dumps(d, ensure_ascii=False)))
    assert back.to_json(CLASSES) == d
    dets = back.detections(CLASSES)
    assert list(dets.data["class_name"]) == ["red backpack", "交通 灯", "chat noir ü"]


def test_yolo_writer_output_is_a_dataset_ultralytics_and_supervision_read(tmp_path):
    rec = make_record(tmp_path)
    writer = YoloWriter(tmp_path / "yolo", CLASSES)
    writer.start()
    writer.write(rec)
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text(encoding="utf-8"))
    assert data["names"] == dict(enumerate(CLASSES)) and data["nc"] == 3
    assert Path(data["path"]).is_absolute()
    lines = (tmp_path / "yolo" / "labels" / "img.txt").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("0 ")
    assert (tmp_path / "yolo" / "images" / "img.jpg").read_bytes() == Path(rec.path).read_bytes()

    import ultralytics.data.utils as du

    with mock.patch.object(du, "check_font", lambda *a, **k: None):  # it would fetch a font for unicode names
        checked = du.check_det_dataset(str(tmp_path / "yolo" / "data.yaml"))
    assert checked["names"] == dict(enumerate(CLASSES))
    ds = sv.DetectionDataset.from_yolo(str(tmp_path / "yolo" / "images"), str(tmp_path / "yolo" / "labels"),
                                       str(tmp_path / "yolo" / "data.yaml"))
    assert ds.classes == CLASSES
    (_, _, dets), = list(ds)
    assert dets.class_id.tolist() == [0, 2, 1]
    np.testing.assert_allclose(dets.xyxy, rec.boxes, atol=0.01)
    assert no_temp_files(tmp_path)


def test_voc_writer_output_parses_back_with_unicode_names(tmp_path):
    rec = make_record(tmp_path)
    writer = VocWriter(tmp_path / "voc", CLASSES)
    writer.start()
    writer.write(rec)
    ds = sv.DetectionDataset.from_pascal_voc(str(tmp_path / "voc" / "JPEGImages"),
                                             str(tmp_path / "voc" / "Annotations"))
    (_, _, dets), = list(ds)
    names = [ds.classes[c] for c in dets.class_id]
    assert names == ["red backpack", "交通 灯", "chat noir ü"]
    np.testing.assert_allclose(dets.xyxy, rec.boxes, atol=1.0)  # VOC stores integer pixels


def test_coco_writer_streams_the_journal_into_valid_coco(tmp_path):
    from pycocotools.coco import COCO

    recs = [make_record(tmp_path, f"d{i}/img{i}.jpg", f"d{i}__img{i}", seed=i) for i in range(3)]
    recs[1] = ImageRecord.from_detections(recs[1].image, recs[1].path, recs[1].key, (60, 80), sv.Detections.empty())
    journal = tmp_path / "p.jsonl"
    with Journal(journal) as j:
        for rec in recs:
            j.append(rec.to_json(CLASSES))
    writer = CocoWriter(tmp_path / "coco" / "annotations.json", CLASSES, {"model": "m"})
    writer.start()
    writer.rebuild(journal)
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    assert [im["file_name"] for im in coco.loadImgs(coco.getImgIds())] == [r.image for r in recs]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 6 and [a["id"] for a in anns] == list(range(1, 7))
    assert len(coco.getAnnIds(imgIds=[2])) == 0
    first = anns[0]
    assert first["category_id"] == 1 and first["score"] == 0.91235
    assert first["bbox"] == [10.12, 5.5, 29.88, 24.75]
    assert first["area"] == pytest.approx(29.88 * 24.75, abs=0.01)
    coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in anns])
    ds = sv.DetectionDataset.from_coco(str(tmp_path / "src"), str(tmp_path / "coco" / "annotations.json"))
    assert ds.classes == CLASSES and len(ds) == 3
    # only the records before `end` (a checkpoint taken while the journal grows)
    end = len(journal.read_bytes().split(b"\n")[0]) + 1
    writer.rebuild(journal, end=end)
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(coco.getImgIds()) == 1 and len(coco.getAnnIds()) == 3


def test_coco_of_empty_journal_is_valid(tmp_path):
    journal = tmp_path / "p.jsonl"
    journal.touch()
    writer = CocoWriter(tmp_path / "c.json", CLASSES)
    writer.rebuild(journal)
    data = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert data["images"] == [] and data["annotations"] == [] and len(data["categories"]) == 3


def test_preview_writer(tmp_path):
    rec = make_record(tmp_path)
    image = cv2.imread(rec.path)
    writer = PreviewWriter(tmp_path / "prev", CLASSES)
    writer.start()
    writer.write(rec, image)
    out = cv2.imread(str(tmp_path / "prev" / "img.jpg"))
    assert out.shape == image.shape
    assert not np.array_equal(out, image)  # boxes were drawn
    assert os.listdir(tmp_path / "prev") == ["img.jpg"]
