"""Promises that belong to relabel, report and eval but that nothing else checked: every command that writes into a
folder takes its lock (and refuses, naming the holder, while another run has it), and relabel's threshold is strict
("a box is kept when its score is above its class's threshold", README and `ovdet relabel --help`)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from conftest import scene
from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.errors import OutputLockedError
from ovdet.jobs.relabel import relabel_run
from ovdet.runs.lock import lock_output

CLASSES = ["red circle", "blue square"]
# float32 scores, as a detector gives them: 0.3 and 0.5 are the thresholds tested below, each with a neighbour a
# journal step (1e-5) above it
SCORES = np.array([0.3, 0.30001, 0.5, 0.50001, 0.9], np.float32)
HOLDER = "holder-test --out X"


class FixedDetector:
    """A detector double whose every image gets the same five boxes, with the SCORES above, all of class 0 but the
    last (class 1): the scores reach the journal exactly as a real run would write them."""

    model_id = "fixed@1"
    embeddings_source = "fixed-text@1"
    imgsz = 64

    def __init__(self):
        self.classes: list[str] = []

    def set_classes(self, spec):
        self.classes = list(spec.names)

    def detect_batch(self, images, conf=None, iou=None, max_det=None, imgsz=None):
        out = []
        for _ in images:
            n = len(SCORES)
            xyxy = np.array([[4 + 8 * i, 4, 12 + 8 * i, 20] for i in range(n)], np.float32)
            cls = np.array([0] * (n - 1) + [1])
            out.append(sv.Detections(xyxy=xyxy, confidence=SCORES.copy(), class_id=cls,
                                     data={"class_name": np.array([self.classes[c] for c in cls], dtype=str)}))
        return out


@pytest.fixture
def run(tmp_path) -> Path:
    """An annotate run folder (two images, five boxes each) at conf 0.25."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f"img{i}.jpg"), scene(48, 64, seed=i))
    out = tmp_path / "run"
    annotate_folder(src, CLASSES, out, detector=FixedDetector(), conf=0.25, formats="coco,yolo,jsonl", quiet=True)
    return out


def _scores(folder: Path) -> list[float]:
    return sorted(d["score"] for line in (folder / "predictions.jsonl").read_text().splitlines()
                  for d in json.loads(line)["detections"])


# ------------------------------------------------------------------ relabel's threshold: strictly above


def test_the_journal_holds_the_boundary_scores_exactly(run):
    assert _scores(run) == sorted([0.3, 0.30001, 0.5, 0.50001, 0.9] * 2)


@pytest.mark.parametrize("args, kept", [
    ({"conf": "red circle=0.3"}, [0.30001, 0.5, 0.50001, 0.9]),  # 0.3 itself is not above 0.3
    ({"conf": "red circle=0.5"}, [0.50001, 0.9]),
    ({"default_conf": 0.5}, [0.50001, 0.9]),
    ({"conf": "red circle=0.30001,blue square=0.9"}, [0.5, 0.50001]),  # the class-1 box at 0.9 is not above 0.9
])
def test_relabel_keeps_a_score_only_when_it_is_above_the_threshold(run, tmp_path, args, kept):
    out = tmp_path / "relabelled"
    summary = relabel_run(run, out, quiet=True, **args)
    assert _scores(out) == sorted(kept * 2)
    assert summary.kept == 2 * len(kept) and summary.dropped == 2 * (len(SCORES) - len(kept))
    coco = json.loads((out / "coco" / "annotations.json").read_text())
    assert sorted(a["score"] for a in coco["annotations"]) == sorted(kept * 2)
    lines = [line for p in (out / "yolo" / "labels").glob("*.txt") for line in p.read_text().splitlines()]
    assert len(lines) == 2 * len(kept)


def test_relabel_cli_at_the_runs_own_threshold_keeps_everything_above_it(run, tmp_path):
    out = tmp_path / "same"
    assert main(["relabel", str(run), "--out", str(out), "--quiet"]) == 0  # floors 0.25: every box is above
    assert _scores(out) == _scores(run)
    assert main(["relabel", str(run), "--out", str(tmp_path / "b"), "--conf", "red circle=0.50001", "--quiet"]) == 0
    assert _scores(tmp_path / "b") == [0.9, 0.9]


# ------------------------------------------------------------------ the output-folder lock, held elsewhere


@contextmanager
def held_elsewhere(folder: Path) -> Iterator[None]:
    """Another thread holds `folder` (as another run would) for the block: the lock excludes threads as it
    excludes processes."""
    holding, release = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def hold():
        try:
            with lock_output(folder, command=HOLDER):
                holding.set()
                release.wait(60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)
            holding.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(30) and not failure, failure
    try:
        yield
    finally:
        release.set()
        thread.join(30)


def _names_the_holder(text: str) -> None:
    assert f"pid {os.getpid()} on host" in text and HOLDER in text, text
    assert "wait for that run to finish" in text


def test_relabel_refuses_an_output_folder_another_run_holds(run, tmp_path, capsys):
    out = tmp_path / "relabelled"
    with held_elsewhere(out):
        with pytest.raises(OutputLockedError) as info:
            relabel_run(run, out, conf="red circle=0.5", quiet=True)
        _names_the_holder(str(info.value))
        assert main(["relabel", str(run), "--out", str(out), "--conf", "red circle=0.5", "--quiet"]) == 2
        _names_the_holder(capsys.readouterr().err)
        assert sorted(p.name for p in out.iterdir()) == [".ovdet-lock"]  # nothing written beside the holder
    assert relabel_run(run, out, conf="red circle=0.5", quiet=True).kept == 4  # free again: it runs


def test_report_refuses_a_run_folder_another_run_holds(run, capsys):
    from ovdet.report import write_report

    before = sorted(p.name for p in run.iterdir())
    with held_elsewhere(run):
        with pytest.raises(OutputLockedError) as info:
            write_report(run, thumbnails=False, quiet=True)
        _names_the_holder(str(info.value))
        assert main(["report", str(run), "--no-thumbs", "--quiet"]) == 2
        _names_the_holder(capsys.readouterr().err)
        assert sorted(p.name for p in run.iterdir() if p.name != ".ovdet-lock") == before  # no report.html
    assert write_report(run, thumbnails=False, quiet=True).is_file()


def test_eval_refuses_an_output_folder_another_run_holds(tiny_detector, tmp_path, capsys):
    from ovdet.jobs.evaluate import evaluate, load_dataset
    from ovdet.jobs.synth import WorldSpec, generate

    data = generate(tmp_path / "world", train=1, val=1, seed=5, spec=WorldSpec(imgsz=96), progress=False)
    out = tmp_path / "eval"
    with held_elsewhere(out):
        with pytest.raises(OutputLockedError) as info:
            evaluate(tiny_detector, load_dataset(data), progress=False, out=out)
        _names_the_holder(str(info.value))
        assert main(["eval", str(data), "--model", "demo", "--device", "cpu", "--quiet", "--out", str(out)]) == 2
        _names_the_holder(capsys.readouterr().err)
        assert sorted(p.name for p in out.iterdir()) == [".ovdet-lock"]
    evaluate(tiny_detector, load_dataset(data), progress=False, out=out)
    assert (out / "run.json").is_file()
