"""ovdet.datasets (yolo, voc, coco, previews) and their foundations: atomic files, the JSONL journal, and each dataset format parsed back by its own tools."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import supervision as sv
import yaml

from ovdet.errors import DatasetError
from ovdet.datasets.coco import CocoWriter
from ovdet.datasets.previews import PreviewWriter
from ovdet.datasets.voc import VocWriter
from ovdet.datasets.yolo import YoloWriter
from ovdet.media.draw import draw
from ovdet.runs.journal import ImageRecord, Journal, checked_image_record, read_journal, repair_journal
from ovdet.util.safeio import atomic_link, atomic_open, atomic_write, ensure_dir, remove_stale_temp_files

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
    with mock.patch("ovdet.util.safeio.os.replace", side_effect=OSError("simulated crash")), pytest.raises(OSError):
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


# ------------------------------------------------------------------ never through a link


def test_temporary_name_is_random_and_created_exclusively(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".f.json.aaaa.ovdet-tmp").symlink_to(victim)  # planted where the first draw lands
    with mock.patch("ovdet.util.safeio.secrets.token_hex", side_effect=["aaaa", "bbbb"]):
        with atomic_open(out / "f.json", "w") as fh:
            assert sorted(os.listdir(out)) == [".f.json.aaaa.ovdet-tmp", ".f.json.bbbb.ovdet-tmp"]
            fh.write("{}")
    assert victim.read_text() == "mine" and (out / "f.json").read_text() == "{}"
    with atomic_open(out / "g.json") as fh:  # unmocked: 16 random hex digits
        name, = [n for n in os.listdir(out) if n.startswith(".g.json.")]
        assert re.fullmatch(r"\.g\.json\.[0-9a-f]{16}\.ovdet-tmp", name)
        fh.write(b"{}")


def test_a_link_at_the_final_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (tmp_path / "f.json").symlink_to(victim)
    atomic_write(tmp_path / "f.json", "{}")
    assert victim.read_text() == "mine" and not (tmp_path / "f.json").is_symlink()


def test_a_link_anywhere_below_the_root_is_refused(tmp_path):
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (elsewhere / "b").mkdir(parents=True)
    root.mkdir()
    (root / "a").symlink_to(elsewhere, target_is_directory=True)
    for write in (lambda: atomic_write(root / "a" / "b" / "f.txt", "x", root=root),
                  lambda: ensure_dir(root / "a" / "b" / "c", root),
                  lambda: atomic_link(__file__, root / "a" / "b" / "l.py", root=root)):
        with pytest.raises(DatasetError, match=r"a symbolic link \(to .*elsewhere\)"):
            write()
    assert [p.name for p in elsewhere.rglob("*")] == ["b"]
    atomic_write(root / "a" / "b" / "f.txt", "x", root=root / "a")  # the root itself may be the user's link
    assert (elsewhere / "b" / "f.txt").read_text() == "x"


def test_stale_temporary_files_are_removed_without_following_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    out = tmp_path / "out"
    (out / ".d.ovdet-tmp").mkdir(parents=True)  # not a file: left alone
    (out / ".f.json.0123456789abcdef.ovdet-tmp").write_text("torn")
    (out / ".l.jpg.99.ovdet-tmp").symlink_to(victim)
    (out / "keep.ovdet-tmp").write_text("not hidden: not ours")
    assert remove_stale_temp_files(out) == 2
    assert sorted(os.listdir(out)) == [".d.ovdet-tmp", "keep.ovdet-tmp"] and victim.read_text() == "mine"
    assert remove_stale_temp_files(tmp_path / "missing") == 0


def test_only_regular_files_are_linked(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    for target in (tmp_path / "fifo.jpg", tmp_path):
        with pytest.raises(DatasetError, match="not a regular file"):
            atomic_link(target, tmp_path / "x.jpg")
    with pytest.raises(DatasetError, match="is gone"):
        atomic_link(tmp_path / "missing.jpg", tmp_path / "x.jpg")
    assert not os.path.lexists(tmp_path / "x.jpg") and no_temp_files(tmp_path)


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_journal_that_is_not_a_plain_file_of_its_own_is_never_written(tmp_path, plant):
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(b'{"i": 0}\n{"torn')
    path = tmp_path / "j.jsonl"
    {"symlink": lambda: path.symlink_to(victim), "hardlink": lambda: os.link(victim, path),
     "fifo": lambda: os.mkfifo(path)}[plant]()
    with pytest.raises(DatasetError, match="not a plain file"):
        repair_journal(path)  # a FIFO: refused at once, no hang
    with pytest.raises(DatasetError, match="not a plain file"):
        Journal(path)
    assert victim.read_bytes() == b'{"i": 0}\n{"torn'


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


def test_a_line_that_is_not_json_is_a_dataset_error(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": \xff}\n')
    with pytest.raises(DatasetError, match="line 2 is not a JSON record"):
        list(read_journal(path))


GOOD = {"image": "a.jpg", "path": "/data/a.jpg", "key": "a", "width": 8, "height": 6,
        "detections": [{"class_id": 1, "class_name": "b", "score": 0.5, "bbox": [0, 0, 4, 3]}],
        "gt": [{"class_id": 0, "bbox": [1, 1, 2, 2]}]}


@pytest.mark.parametrize("field,value,words", [
    ("image", 3, "'image' is not"), ("path", "a\0b", "'path' is not"), ("key", "\ud800", "'key' is not"),
    ("key", "k" * 260, "too long"), ("width", 0, "'width'"), ("height", True, "'height'"),
    ("detections", None, "'detections' is not a list"),
    ("detections", [{"class_id": 2, "score": 0.5, "bbox": [0, 0, 1, 1]}], "class_id"),
    ("detections", [{"class_id": -1, "score": 0.5, "bbox": [0, 0, 1, 1]}], "class_id"),
    ("detections", [{"class_id": 0, "score": float("nan"), "bbox": [0, 0, 1, 1]}], "score"),
    ("detections", [{"class_id": 0, "score": 0.5, "bbox": [0, 0, 1e999, 1]}], "bbox"),
    ("detections", [{"class_id": 0, "score": 0.5, "bbox": [0, 0, 10 ** 400, 1]}], "bbox"),
    ("detections", [{"class_id": 0, "score": 0.5, "bbox": [0, 0, False, 1]}], "bbox"),
    ("detections", [{"class_id": True, "score": 0.5, "bbox": [0, 0, 1, 1]}], "class_id"),
    ("gt", [{"class_id": 0, "bbox": [0, 0, 1]}], "bbox"),
])
def test_image_records_are_checked_field_by_field(field, value, words):
    assert checked_image_record(GOOD, 2) is GOOD
    with pytest.raises(DatasetError, match=re.escape(words)):
        checked_image_record({**GOOD, field: value}, 2)


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
    assert os.listdir(tmp_path / "prev") == ["img.jpg"]

    def jpeg(pixels: np.ndarray) -> np.ndarray:  # what the writer's own encoding makes of these pixels
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, writer.quality])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)

    # the preview is the image with the record's boxes drawn, and the boxes really show: along the first box's top
    # edge (y 5..6, x 12..38) the preview is far from the plain image re-encoded the same way (a JPEG of the
    # untouched image differs from the original too, so "not equal to the image" would prove nothing)
    assert np.array_equal(out, jpeg(draw(image, rec.detections(CLASSES))))
    edge = (slice(5, 7), slice(12, 38))
    assert np.abs(out[edge].astype(int) - jpeg(image)[edge].astype(int)).mean() > 30
