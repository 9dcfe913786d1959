"""annotate_folder and `ovdet annotate`: datasets parsed back, bad files, up-front errors, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import supervision as sv
import torch
import yaml
from PIL import Image

from conftest import (CROSS_RUN_TOLERANCE, assert_close_data, assert_close_text, deny_reading, outline_difference,
                      random_embeddings, random_world_model, scene)
from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.errors import DatasetError, ResumeMismatchError
from ovdet.runs.lock import LOCK_NAME, read_holder

CLASSES = ["red box", "chat noir ü", "交通 灯"]
REPO = Path(__file__).resolve().parents[1]


class FakeDetector:
    """Deterministic detector double: boxes drawn from a seed computed from the pixels, independent of batching."""

    def __init__(self, model_id: str = "fake@1", fail_after: int | None = None):
        self.classes: list[str] = []
        self.model_id = model_id
        self.embeddings_source = "fake-text@1"
        self.imgsz = 64
        self.fail_after = fail_after
        self.calls = 0

    def set_classes(self, spec):
        self.classes = list(spec.names)

    def detect_batch(self, images, conf=None, iou=None, max_det=None, imgsz=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C (or a crash) does in the middle of a run
        self.calls += 1
        out = []
        for im in images:
            h, w = im.shape[:2]
            rng = np.random.default_rng(int(im[::5, ::5].astype(np.int64).sum()))
            n = int(rng.integers(0, 4))
            xy = rng.uniform(0, 0.5, (n, 2)) * [w, h]
            wh = rng.uniform(0.1, 0.5, (n, 2)) * [w, h]
            cls = rng.integers(0, len(self.classes), n)
            out.append(sv.Detections(
                xyxy=np.concatenate([xy, xy + wh], 1).astype(np.float32).reshape(-1, 4),
                confidence=rng.uniform(0.3, 1.0, n).astype(np.float32), class_id=cls,
                data={"class_name": np.array([self.classes[c] for c in cls], dtype=str)}))
        return out


def make_images(root: Path, n: int, size: tuple[int, int] = (96, 128)) -> list[str]:
    """n generated JPEGs, every third one in a subfolder; returns their paths relative to root."""
    rels = []
    for i in range(n):
        rel = f"sub/img{i:03d}.jpg" if i % 3 == 0 else f"img{i:03d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), scene(*size, seed=i))
        rels.append(rel)
    return sorted(rels, key=lambda r: r.split("/"))


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file's content (links by their target, own folder name masked), keyed by relative path."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_symlink():
            files[rel] = os.readlink(p).encode()
        elif p.is_file() and rel != "yolo/labels.cache":
            files[rel] = p.read_bytes().replace(str(out).encode(), b"<OUT>")
    return files


def assert_outputs_close(out: Path, ref: Path, min_side: int) -> None:
    """The output files of two runs of the same images in different processes: the same files and link targets,
    JSON equal but for box, area and score floats (CROSS_RUN_TOLERANCE), YOLO and VOC labels equal word for word
    with their numbers within that tolerance (YOLO's normalised by the smallest image side, `min_side`)."""
    got, want = snapshot(out), snapshot(ref)
    assert sorted(got) == sorted(want)
    yolo_tol = CROSS_RUN_TOLERANCE["bbox"] / min_side + 1e-5  # + the 5-decimal rounding of the label file
    for rel, content in want.items():
        if (ref / rel).is_symlink():
            assert got[rel] == content, rel
        elif rel.endswith(".json"):
            assert_close_data(json.loads(got[rel]), json.loads(content), where=rel)
        elif rel.endswith(".jsonl"):
            assert_close_data([json.loads(x) for x in got[rel].splitlines()],
                              [json.loads(x) for x in content.splitlines()], where=rel)
        elif rel.startswith("yolo/labels/"):
            assert_close_text(got[rel].decode(), content.decode(), yolo_tol)
        elif rel.startswith("voc/Annotations/"):
            assert_close_text(got[rel].decode(), content.decode(), CROSS_RUN_TOLERANCE["voc"])
        else:
            assert got[rel] == content, rel


def assert_exactly_once(out: Path, expected: set[str]) -> None:
    """Each expected image once in the journal, COCO, YOLO and VOC; nothing else in any of them."""
    recs = journal(out)
    images = [r["image"] for r in recs]
    assert sorted(images) == sorted(expected) and len(images) == len(set(images))
    keys = {r["key"] for r in recs}
    coco = json.loads((out / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(expected)
    assert len(coco["annotations"]) == sum(len(r["detections"]) for r in recs)
    assert {p.stem for p in (out / "yolo" / "labels").glob("*.txt")} == keys
    assert {p.stem for p in (out / "yolo" / "images").iterdir()} == keys
    assert {p.stem for p in (out / "voc" / "Annotations").glob("*.xml")} == keys
    assert not [p for p in out.rglob("*") if p.name.endswith(".ovdet-tmp")]


# ------------------------------------------------------------------ formats with the real (random-weight) model


def test_every_format_parses_back_with_unicode_class_names(tiny_detector, tmp_path):
    from pycocotools.coco import COCO
    import ultralytics.data.utils as du
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset

    src, out = tmp_path / "photos", tmp_path / "labels"
    make_images(src, 4)
    gray16 = (cv2.cvtColor(scene(80, 100, seed=9), cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    cv2.imwrite(str(src / "deep16.png"), gray16)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 100 wide x 60 high, shown rotated: 60 x 100
    Image.fromarray(scene(60, 100, seed=10)[:, :, ::-1]).save(src / "rotated.jpg", exif=exif.tobytes())
    expected = {"img001.jpg", "img002.jpg", "sub/img000.jpg", "sub/img003.jpg", "deep16.png", "rotated.jpg"}

    summary = annotate_folder(src, CLASSES, out, detector=tiny_detector, conf=0.0, max_det=3, batch=4,
                              save_annotated=True, quiet=True)
    assert summary.images_found == summary.images_done == 6 and not summary.skipped
    assert summary.images_already_done == 0 and summary.seconds > 0 and summary.images_per_second > 0
    recs = journal(out)
    n_det = sum(len(r["detections"]) for r in recs)
    assert n_det == sum(summary.detections_per_class.values()) > 0
    assert list(summary.detections_per_class) == CLASSES
    assert all(1 <= len(r["detections"]) <= 3 for r in recs)
    assert {d["class_name"] for r in recs for d in r["detections"]} <= set(CLASSES)
    by_image = {r["image"]: r for r in recs}
    assert (by_image["rotated.jpg"]["width"], by_image["rotated.jpg"]["height"]) == (60, 100)
    assert_exactly_once(out, expected)

    coco = COCO(str(out / "coco" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    assert len(coco.getAnnIds()) == n_det
    assert all(0.0 <= a["score"] <= 1.0 and a["area"] > 0 for a in coco.loadAnns(coco.getAnnIds()))
    ds = sv.DetectionDataset.from_coco(str(src), str(out / "coco" / "annotations.json"))
    assert ds.classes == CLASSES and len(ds) == 6

    with mock.patch.object(du, "check_font", lambda *a, **k: None):  # it would download a unicode font
        data = du.check_det_dataset(str(out / "yolo" / "data.yaml"))
    assert data["names"] == dict(enumerate(CLASSES))
    yolo = YOLODataset(img_path=data["train"], data=data, imgsz=64, augment=False, task="detect", hyp=get_cfg())
    label_files = list((out / "yolo" / "labels").glob("*.txt"))
    assert sum(len(p.read_text().splitlines()) for p in label_files) == n_det
    # ultralytics drops repeated identical lines (a random head often predicts the same clipped box twice)
    unique = sum(len(set(p.read_text().splitlines())) for p in label_files)
    assert len(yolo.labels) == 6 and sum(len(lb["cls"]) for lb in yolo.labels) == unique
    ds = sv.DetectionDataset.from_yolo(str(out / "yolo" / "images"), str(out / "yolo" / "labels"),
                                       str(out / "yolo" / "data.yaml"))
    assert ds.classes == CLASSES and sum(len(d) for _, _, d in ds) == n_det

    ds = sv.DetectionDataset.from_pascal_voc(str(out / "voc" / "JPEGImages"), str(out / "voc" / "Annotations"))
    assert len(ds) == 6 and sum(len(d) for _, _, d in ds) == n_det
    assert set(ds.classes) <= set(CLASSES)

    assert len(list((out / "annotated").glob("*.jpg"))) == 6
    settings = json.loads((out / "run.json").read_text(encoding="utf-8"))["settings"]
    assert [c["name"] for c in settings["classes"]["classes"]] == CLASSES
    assert settings["model"] == tiny_detector.model_id and settings["text_model"] == tiny_detector.text_identity
    assert tiny_detector.embeddings_source == tiny_detector.text_identity


def test_previews_show_the_boxes(tmp_path):
    """Each preview is its image with every journal box drawn on it: on the box outlines it differs from the same
    image JPEG-encoded as the preview is (quality 90), which it would equal pixel for pixel with nothing drawn."""
    from ovdet.media.sources import load_image

    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 3)
    annotate_folder(src, CLASSES, out, detector=FakeDetector(), save_annotated=True, quiet=True)
    boxes = 0
    for rec in journal(out):
        preview = cv2.imread(str(out / "annotated" / f"{rec['key']}.jpg"))
        plain = cv2.imdecode(cv2.imencode(".jpg", load_image(rec["path"]), [cv2.IMWRITE_JPEG_QUALITY, 90])[1],
                             cv2.IMREAD_COLOR)
        assert preview.shape == plain.shape
        if not rec["detections"]:
            assert np.array_equal(preview, plain)  # nothing to draw: the image itself
        for d in rec["detections"]:
            assert outline_difference(preview, plain, d["bbox"]) > 20, (rec["image"], d)
            boxes += 1
    assert boxes >= 2


# ------------------------------------------------------------------ bad input


def test_bad_files_are_recorded_and_skipped(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    good = make_images(src, 3)
    jpeg = (src / "img001.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "zero.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("definitely not an image")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3)
    (src / "broken-link.jpg").symlink_to(src / "missing.jpg")
    bad = {"truncated.jpg": "truncated", "zero.jpg": "empty", "text.jpg": "not a recognised image",
           "corrupt.png": "corrupt|not a recognised", "broken-link.jpg": "does not exist"}

    summary = annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=2, quiet=True)
    assert summary.images_done == 3 and len(summary.skipped) == 5
    errs = errors(out)
    assert sorted(e["image"] for e in errs) == sorted(bad)
    for e in errs:
        assert e["path"] == str(src / e["image"])
        assert e["reason"] and __import__("re").search(bad[e["image"]], e["reason"]), e
    assert_exactly_once(out, set(good))

    # a rerun retries the bad files (they may have been fixed) and still lists each once
    (src / "text.jpg").write_bytes(jpeg)
    again = annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=2, quiet=True)
    assert again.images_done == 1 and again.images_already_done == 3 and len(again.skipped) == 4
    assert sorted(e["image"] for e in errors(out)) == sorted(set(bad) - {"text.jpg"})
    assert_exactly_once(out, set(good) | {"text.jpg"})


def test_unreadable_file_is_recorded(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 2)
    deny_reading(src / "img001.jpg", monkeypatch)
    summary = annotate_folder(src, CLASSES, out, detector=FakeDetector(), quiet=True)
    assert summary.images_done == 1 and [Path(p).name for p, _ in summary.skipped] == ["img001.jpg"]
    [err] = errors(out)
    assert err["image"] == "img001.jpg" and "permission denied" in err["reason"]
    assert [r["image"] for r in journal(out)] == ["sub/img000.jpg"]


def never_built():
    pytest.fail("the detector was built before the folders were checked")


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no-images", "out-inside", "out-is-src", "format",
                                  "foreign-out", "out-is-file"])
def test_clear_errors_up_front(tmp_path, case):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    kwargs = {}
    if case != "empty":
        make_images(src, 2)
    if case == "missing":
        src = tmp_path / "nope"
        match = "does not exist"
    elif case == "file":
        src = src / "img001.jpg"
        match = "not a folder"
    elif case == "empty":
        match = "no image files"
    elif case == "no-images":
        for p in src.rglob("*.jpg"):
            p.rename(p.with_suffix(".txt"))
        match = "no image files"
    elif case == "out-inside":
        out = src / "sub" / "labels"
        match = "inside the input folder"
    elif case == "out-is-src":
        out = src
        match = "inside the input folder"
    elif case == "format":
        kwargs["formats"] = "coco,labelme"
        match = "unknown output format 'labelme'"
    elif case == "foreign-out":
        out.mkdir()
        (out / "thesis.docx").write_text("precious")
        match = "not empty"
    else:
        out.write_text("x")
        match = "is a file"
    with pytest.raises(DatasetError, match=match):
        annotate_folder(src, CLASSES, out, detector=never_built, quiet=True, **kwargs)


# ------------------------------------------------------------------ resume


def test_given_embeddings_need_no_text_tower_and_are_checked_on_resume(tiny_world_checkpoint, tmp_path):
    from ovdet import OVDetector

    det = OVDetector(tiny_world_checkpoint, device="cpu", imgsz=160)  # its default CLIP tower is not here (offline)
    det.set_embeddings(CLASSES, random_embeddings(len(CLASSES), seed=0))
    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 2)
    summary = annotate_folder(src, CLASSES, out, detector=det, conf=0.0, max_det=2, quiet=True)
    assert summary.images_done == 2
    det.set_embeddings(CLASSES, random_embeddings(len(CLASSES), seed=1))
    with pytest.raises(ResumeMismatchError, match="text_model"):
        annotate_folder(src, CLASSES, out, detector=det, conf=0.0, max_det=2, quiet=True)


def test_class_specs_keep_the_users_names(tiny_detector, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 2)
    annotate_folder(src, ["red box|crimson box", "blue", "!reflection"], out, detector=tiny_detector, conf=0.0,
                    max_det=5, formats="coco,jsonl", quiet=True)
    coco = json.loads((out / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in coco["categories"]] == ["red box", "blue"] == tiny_detector.classes
    names = {d["class_name"] for line in journal(out) for d in line["detections"]}
    assert names and names <= {"red box", "blue"}


@pytest.mark.parametrize("change, match", [
    ({"classes": ["red box", "dog"]}, "classes differ: red box, chat noir ü, 交通 灯 → red box, dog"),
    ({"detector": FakeDetector("other@2")}, "model: fake@1 → other@2"),
    ({"conf": 0.5}, "conf"),
    ({"formats": "coco"}, "formats"),
    ({"classes": CLASSES + ["!reflection"]}, "negatives: none → reflection"),
])
def test_resume_with_other_settings_is_refused_unless_overwrite(tmp_path, change, match):
    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 3)
    base = {"classes": CLASSES, "detector": FakeDetector(), "quiet": True}
    annotate_folder(src, out=out, **base)
    (out / "my-notes.txt").write_text("keep me")
    args = {**base, **change}
    with pytest.raises(ResumeMismatchError, match=f"{match}.*--overwrite"):
        annotate_folder(src, out=out, **args)
    if "detector" in change:
        args["detector"] = FakeDetector("other@2")
    summary = annotate_folder(src, out=out, overwrite=True, **args)
    assert summary.images_done == 3 and summary.images_already_done == 0
    assert (out / "my-notes.txt").read_text() == "keep me"  # --overwrite removes only ovdet's outputs
    assert len(journal(out)) == 3


def test_interrupted_run_resumes_exactly_once_and_matches_a_clean_run(tmp_path):
    src = tmp_path / "src"
    rels = make_images(src, 13)
    (src / "zz-bad.jpg").write_text("x")
    clean = tmp_path / "clean"
    annotate_folder(src, CLASSES, clean, detector=FakeDetector(), batch=3, quiet=True, save_annotated=True)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        annotate_folder(src, CLASSES, out, detector=FakeDetector(fail_after=2), batch=3, quiet=True,
                        save_annotated=True)
    assert len(journal(out)) == 6
    json.loads((out / "coco" / "annotations.json").read_text(encoding="utf-8"))  # valid while interrupted
    # what a power cut could add: half a journal line, and temporary files of writes in flight
    with open(out / "predictions.jsonl", "ab") as fh:
        fh.write(b'{"image":"img007.jpg","path":"/x","key":"img0')
    (out / "yolo" / "labels" / ".img007.txt.123.ovdet-tmp").write_text("0 0.5")
    (out / "coco" / ".annotations.json.123.ovdet-tmp").write_text("{")

    summary = annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=3, quiet=True, save_annotated=True)
    assert summary.images_already_done == 6 and summary.images_done == 7 and len(summary.skipped) == 1
    assert_exactly_once(out, set(rels))
    assert snapshot(out) == snapshot(clean)

    nothing = annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=3, quiet=True, save_annotated=True)
    assert nothing.images_done == 0 and nothing.images_already_done == 13
    assert snapshot(out) == snapshot(clean)


def test_output_names_never_collide(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for rel in ["a.jpg", "a.png", "A.jpg", "sub/a.jpg", "sub__a.jpg", "sub/a.png"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), scene(64, 64, seed=len(rel)))
    annotate_folder(src, CLASSES, out, detector=FakeDetector(), quiet=True)
    recs = journal(out)
    assert len({r["key"].lower() for r in recs}) == 6
    assert_exactly_once(out, {r["image"] for r in recs})
    for r in recs:  # each label file belongs to its own image
        assert os.readlink(out / "yolo" / "images" / f"{r['key']}{Path(r['image']).suffix}") == r["path"]


def test_quiet_prints_nothing_and_summary_line(tmp_path, capsys):
    src = tmp_path / "src"
    make_images(src, 2)
    summary = annotate_folder(src, CLASSES, tmp_path / "out", detector=FakeDetector(), quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    line = summary.line()
    assert line.startswith("annotated 2 images") and "img/s" in line and str(tmp_path / "out") in line


# ------------------------------------------------------------------ CLI, kill -9


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A random yolov8n-worldv2 checkpoint that carries its (random, small) text tower, so the CLI runs offline."""
    from ovdet.text.tower import TextEncoder

    path = tmp_path_factory.mktemp("ckpt") / "tiny-ovdet.pt"
    torch.save({"model": random_world_model(seed=0), "train_args": {},
                "ovdet_text_encoder": TextEncoder.random(seed=0).to_state()}, path)
    return path


def cli_args(src: Path, out: Path, ckpt: Path) -> list[str]:
    return ["annotate", str(src), "--classes", ",".join(CLASSES), "--out", str(out), "--model", str(ckpt),
            "--device", "cpu", "--imgsz", "160", "--conf", "0.01", "--max-det", "3", "--batch", "1"]


def test_cli_runs_and_reports(tmp_path, cli_checkpoint, capsys, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 3)
    monkeypatch.setenv("OVDET_PROGRESS_SECONDS", "0")
    assert main(cli_args(src, out, cli_checkpoint) + ["--format", "yolo,jsonl"]) == 0
    err = capsys.readouterr().err
    assert "annotated 3 images" in err and "img/s" in err
    assert "\r" not in err and "annotate: 1/3 (33%) " in err and "annotate: 3/3 (100%) in " in err  # a log
    assert len(journal(out)) == 3 and (out / "yolo" / "data.yaml").exists() and not (out / "coco").exists()
    assert main(cli_args(src, out, cli_checkpoint) + ["--format", "yolo,jsonl", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(cli_args(tmp_path / "missing", tmp_path / "o2", cli_checkpoint)) == 2
    assert "input folder does not exist" in capsys.readouterr().err


def test_cli_save_annotated_writes_previews_with_the_boxes(tmp_path, cli_checkpoint):
    from ovdet.media.sources import load_image

    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 2)
    assert main(cli_args(src, out, cli_checkpoint) + ["--format", "jsonl", "--save-annotated", "--quiet"]) == 0
    recs = journal(out)
    assert sorted(p.stem for p in (out / "annotated").iterdir()) == sorted(r["key"] for r in recs)
    for rec in recs:
        preview = cv2.imread(str(out / "annotated" / f"{rec['key']}.jpg"))
        plain = cv2.imdecode(cv2.imencode(".jpg", load_image(rec["path"]), [cv2.IMWRITE_JPEG_QUALITY, 90])[1],
                             cv2.IMREAD_COLOR)
        assert rec["detections"] and not np.array_equal(preview, plain)
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["settings"]["save_annotated"] is True


def check_outputs_valid(out: Path) -> int:
    """Every output file parses right now; returns the number of finished images."""
    if (out / "coco" / "annotations.json").exists():
        json.loads((out / "coco" / "annotations.json").read_text(encoding="utf-8"))
    if (out / "yolo" / "data.yaml").exists():
        assert yaml.safe_load((out / "yolo" / "data.yaml").read_text(encoding="utf-8"))["nc"] == len(CLASSES)
    if not (out / "predictions.jsonl").exists():
        return 0
    lines = (out / "predictions.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""  # whole lines only, even under kill -9
    for line in lines[:-1]:
        json.loads(line)
    return len(lines) - 1


def test_kill_9_at_any_moment_then_rerun_finishes_exactly_once(tmp_path, cli_checkpoint):
    from ovdet.detector import OVDetector

    src = tmp_path / "src"
    rels = make_images(src, 30)  # enough that each kill lands mid-run even on a fast machine
    clean = tmp_path / "clean"
    det = OVDetector(cli_checkpoint, device="cpu", imgsz=160)
    annotate_folder(src, CLASSES, clean, detector=det, imgsz=160, conf=0.01, max_det=3, batch=1, quiet=True)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ovdet.cli", *cli_args(src, out, cli_checkpoint), "--quiet"]
    for kill_at in (3, 12):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if check_outputs_valid(out) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        done = check_outputs_valid(out)
        assert kill_at <= done < len(rels)
        assert read_holder(out)["pid"] == proc.pid  # its lock file is left behind; the next run is not blocked
    # the finishing run is the CLI in this process: it takes over the lock the killed one left, does the rest
    assert main(cli_args(src, out, cli_checkpoint) + ["--quiet"]) == 0
    assert_exactly_once(out, set(rels))
    # another process computed these: floats within the stated tolerances, everything else exactly
    assert_close_data(journal(out), journal(clean))
    assert_outputs_close(out, clean, min_side=96)
    assert not (out / LOCK_NAME).exists()


def test_a_second_run_into_the_same_folder_fails_at_once_naming_the_first(tmp_path, cli_checkpoint, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    rels = make_images(src, 4)
    cmd = [sys.executable, "-m", "ovdet.cli", *cli_args(src, out, cli_checkpoint), "--quiet"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while (read_holder(out) or {}).get("pid") != first.pid:  # it holds the folder ...
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # ... and stays in the middle of its run while the second starts
        # the second run is the CLI in this process (another pid than the first's): an error raised past main()
        # fails the test as a traceback would
        capsys.readouterr()
        second_rc = main(cli_args(src, out, cli_checkpoint) + ["--quiet"])
        second_err = capsys.readouterr().err
        # meanwhile a run into another folder is not held up
        assert annotate_folder(src, CLASSES, tmp_path / "other", detector=FakeDetector(), quiet=True).images_done == 4
    finally:
        first.send_signal(signal.SIGCONT)
    assert second_rc == 2
    assert "Traceback" not in second_err
    assert f"is in use by another ovdet run: pid {first.pid} on host" in second_err
    assert "annotate" in second_err and "wait for that run to finish" in second_err
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert_exactly_once(out, set(rels))
    assert not (out / LOCK_NAME).exists()
