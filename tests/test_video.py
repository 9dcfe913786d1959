"""Video job: output keeps size/fps/frame count, JSONL has one line per frame, tracking keeps ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import supervision as sv
import torch
from conftest import random_world_model
from test_capture import BlobDetector, make_video, moving_square_frames, video_props

from ovdet.cli import main
from ovdet.errors import SourceError
from ovdet.media.stream import Tracker, stream
from ovdet.video.job import VideoOutputError, process_video


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def box_detections(boxes, scores, class_ids=None) -> sv.Detections:
    n = len(boxes)
    class_ids = np.zeros(n, int) if class_ids is None else np.asarray(class_ids)
    return sv.Detections(xyxy=np.asarray(boxes, np.float32).reshape(n, 4), confidence=np.asarray(scores, np.float32),
                         class_id=class_ids, data={"class_name": np.array(["obj"] * n, dtype=str)})


def test_tracker_keeps_ids_of_steadily_moving_objects():
    tracker = Tracker(high_thresh=0.5, fps=30)
    ids_a, ids_b = [], []
    for i in range(30):
        moving = [10 + 6 * i, 50, 60 + 6 * i, 100]  # 6 px per frame to the right
        still = [300, 20, 340, 80]
        out = tracker.update(box_detections([still, moving], [0.8, 0.9]), timestamp=i / 30)
        if i == 0:
            assert len(out) == 0  # ByteTrack confirms a track on its second sighting
            continue
        by_x = {float(box[0]): tid for box, tid in zip(out.xyxy, out.tracker_id)}
        ids_a.append(by_x[float(moving[0])])
        ids_b.append(by_x[300.0])
    assert len(set(ids_a)) == 1 and len(set(ids_b)) == 1 and ids_a[0] != ids_b[0]


def test_tracker_bridges_a_short_gap_and_weak_detections():
    tracker = Tracker(high_thresh=0.5, low_thresh=0.1, buffer_s=1.0, fps=30)
    seen = []
    for i in range(20):
        box = [10 + 5 * i, 40, 50 + 5 * i, 80]
        if 8 <= i < 11:
            dets = box_detections([], [])  # missed for 3 frames
        else:
            dets = box_detections([box], [0.2 if i >= 14 else 0.9])  # weak detections only extend the track
        out = tracker.update(dets, timestamp=i / 30)
        if len(out):
            seen.append((i, int(out.tracker_id[0])))
    ids = {tid for _, tid in seen}
    assert len(ids) == 1
    assert [i for i, _ in seen] == [i for i in range(1, 20) if not 8 <= i < 11]


def test_tracker_reset_forgets_tracks():
    tracker = Tracker(high_thresh=0.5)
    for i in range(3):
        tracker.update(box_detections([[0, 0, 10, 10]], [0.9]), timestamp=i / 30)
    tracker.reset()
    assert len(tracker.update(box_detections([[0, 0, 10, 10]], [0.9]), timestamp=1.0)) == 0


@pytest.mark.parametrize("track", [False, True])
def test_video_job_keeps_size_fps_and_frames(tmp_path, track):
    src = make_video(tmp_path / "in.mp4", n=20, size=(160, 120), fps=12)
    out, jsonl = tmp_path / "out" / "annotated.mp4", tmp_path / "dets.jsonl"
    report = process_video(BlobDetector(), src, out, jsonl, track=track, batch=4, progress=False)
    assert report.frames == 20 and report.out == out and report.jsonl == jsonl
    assert video_props(out) == (20, 160, 120, pytest.approx(12))
    records = read_jsonl(jsonl)
    assert [r["frame"] for r in records] == list(range(20))
    assert [r["time"] for r in records] == pytest.approx([i / 12 for i in range(20)], abs=1e-3)
    first_tracked = 1 if track else 0
    assert all(len(r["detections"]) == 1 for r in records[first_tracked:])
    det = records[5]["detections"][0]
    assert det["class"] == "square" and det["score"] == pytest.approx(0.9)
    assert det["xyxy"][0] == pytest.approx(10 + 4 * 5, abs=2)
    track_ids = {r["detections"][0]["track_id"] for r in records[first_tracked:]}
    assert track_ids == ({0} if track else {None})
    assert sorted(p.name for p in tmp_path.rglob("*partial*")) == []


def test_video_output_is_annotated(tmp_path):
    src = make_video(tmp_path / "in.mp4", n=5)
    process_video(BlobDetector(), src, tmp_path / "out.mp4", progress=False)
    import cv2

    original, annotated = cv2.VideoCapture(str(src)), cv2.VideoCapture(str(tmp_path / "out.mp4"))
    diffs = [np.abs(original.read()[1].astype(int) - annotated.read()[1].astype(int)).mean() for _ in range(5)]
    assert min(diffs) > 1  # boxes and labels were drawn on every frame


def test_batching_does_not_change_results(tmp_path):
    src = make_video(tmp_path / "in.mp4", n=11)
    process_video(BlobDetector(), src, None, tmp_path / "b1.jsonl", track=True, batch=1, progress=False)
    process_video(BlobDetector(), src, None, tmp_path / "b4.jsonl", track=True, batch=4, progress=False)
    assert read_jsonl(tmp_path / "b1.jsonl") == read_jsonl(tmp_path / "b4.jsonl")


def test_unwritable_output_leaves_no_partial_files(tmp_path):
    src = make_video(tmp_path / "in.mp4", n=5)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(VideoOutputError):
        process_video(BlobDetector(), src, blocker / "out.mp4", progress=False)
    with pytest.raises(VideoOutputError):
        process_video(BlobDetector(), src, tmp_path / "out.mp4", blocker / "d.jsonl", progress=False)
    assert not (tmp_path / "out.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.mp4"]


def test_missing_video_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        process_video(BlobDetector(), tmp_path / "missing.mp4", tmp_path / "out.mp4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stream_from_frames_with_tracking():
    results = list(stream(BlobDetector(), moving_square_frames(8), track=True))
    assert len(results) == 8
    frame, dets = results[3]
    assert frame.shape == (120, 160, 3)
    assert dets.tracker_id is not None and list(dets.tracker_id) == [0]
    assert all(len(d) == 1 and d.tracker_id[0] == 0 for _, d in results[1:])


def test_real_model_video_job_and_stream(tmp_path, tiny_detector):
    tiny_detector.set_classes(["square", "background"])
    src = make_video(tmp_path / "in.mp4", n=6, size=(160, 120), fps=10)
    report = process_video(tiny_detector, src, tmp_path / "out.mp4", tmp_path / "d.jsonl", track=True, conf=0.05,
                           batch=3, progress=False)
    assert report.frames == 6
    assert video_props(tmp_path / "out.mp4") == (6, 160, 120, pytest.approx(10))
    records = read_jsonl(tmp_path / "d.jsonl")
    assert [r["frame"] for r in records] == list(range(6))
    dets = [d for r in records for d in r["detections"]]
    assert dets, "expected some detections from the random model at conf 0.05"
    assert all(d["class"] in ("square", "background") and isinstance(d["track_id"], int) for d in dets)

    pairs = list(tiny_detector.stream(str(src), track=True, conf=0.05))
    assert len(pairs) == 6
    assert all(f.shape == (120, 160, 3) and d.tracker_id is not None for f, d in pairs)


def test_cli_video(tmp_path, tiny_text_encoder, capsys, monkeypatch):
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": random_world_model(), "train_args": {}, "ovdet_text_encoder": tiny_text_encoder.to_state()},
               ckpt)
    src = make_video(tmp_path / "in.mp4", n=6, size=(128, 96), fps=8)
    out, jsonl = tmp_path / "cli.mp4", tmp_path / "cli.jsonl"
    code = main(["video", str(src), "--classes", "person,car", "--out", str(out), "--track", "--jsonl", str(jsonl),
                 "--model", str(ckpt), "--device", "cpu", "--imgsz", "160", "--conf", "0.05", "--no-progress"])
    assert code == 0
    assert video_props(out) == (6, 128, 96, pytest.approx(8))
    assert len(read_jsonl(jsonl)) == 6
    captured = capsys.readouterr()
    assert captured.out == "" and "6 frames" in captured.err and f"wrote {jsonl}" in captured.err
    monkeypatch.setenv("OVDET_PROGRESS_SECONDS", "0")
    args = ["video", str(src), "--classes", "person", "--jsonl", str(tmp_path / "q.jsonl"), "--model", str(ckpt),
            "--device", "cpu", "--imgsz", "160"]
    assert main(args) == 0
    err = capsys.readouterr().err  # not a terminal: whole progress lines
    assert "\r" not in err and "in.mp4: 3/6 (50%) " in err and "in.mp4: 6/6 (100%) in " in err
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr() == ("", "")

    code = main(["video", str(tmp_path / "missing.mp4"), "--classes", "person", "--model", str(ckpt),
                 "--device", "cpu", "--imgsz", "160"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
