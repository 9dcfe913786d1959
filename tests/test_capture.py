"""Capture: files give every frame in order, live sources the newest one, and nothing ever hangs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from ovdet.media.capture import FrameIterable, VideoCapture, open_source
from ovdet.detector import parse_class_names
from ovdet.errors import InvalidImageError, SourceError


def moving_square_frames(n: int = 12, size: tuple[int, int] = (160, 120), step: int = 4) -> list[np.ndarray]:
    """BGR frames of a white square moving right (wrapping around) on a dark background that brightens
    by 3 per frame (for 20 frames, then wraps), so the index can be read back from the pixels."""
    width, height = size
    frames = []
    for i in range(n):
        frame = np.full((height, width, 3), 10 + 3 * (i % 20), np.uint8)
        x = 10 + (step * i) % (width - 50)
        cv2.rectangle(frame, (x, 40), (x + 30, 70), (255, 255, 255), -1)
        frames.append(frame)
    return frames


def make_video(path: Path, n: int = 12, size: tuple[int, int] = (160, 120), fps: float = 15.0) -> Path:
    """Write `n` moving-square frames to an mp4v file."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for frame in moving_square_frames(n, size):
        writer.write(frame)
    writer.release()
    return path


def video_props(path: Path) -> tuple[int, int, int, float]:
    """(frames actually decodable, width, height, fps) of a video file."""
    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.read()[0]:
        count += 1
    props = (count, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
             float(cap.get(cv2.CAP_PROP_FPS)))
    cap.release()
    return props


class BlobDetector:
    """Stands in for OVDetector: every bright blob is a detection of the first class (score 0.9)."""

    conf = 0.25

    def __init__(self, classes=("square",)):
        self._classes = list(classes)
        self.set_calls: list[list[str]] = []

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def set_classes(self, classes) -> None:
        self.set_calls.append(list(classes))
        self._classes = parse_class_names(classes)

    def detect_batch(self, images, conf=None, **kw) -> list[sv.Detections]:
        out = []
        for image in images:
            gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            _, _, stats, _ = cv2.connectedComponentsWithStats((gray > 200).astype(np.uint8))
            boxes = [[x, y, x + w, y + h] for x, y, w, h, area in stats[1:] if area > 20]
            k = len(boxes)
            out.append(sv.Detections(xyxy=np.array(boxes, np.float32).reshape(k, 4),
                                     confidence=np.full(k, 0.9, np.float32), class_id=np.zeros(k, int),
                                     data={"class_name": np.array([self._classes[0]] * k, dtype=str)}))
        return out


class FakeCamera:
    """cv2.VideoCapture stand-in: `frames` good reads, then `then`: "fail" (read → False) or "block"."""

    def __init__(self, frames: int, then: str):
        self.frames, self.then = frames, then
        self.unblock = threading.Event()
        self.released = False

    def __call__(self, *args, **kwargs) -> FakeCamera:
        return self

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if self.frames > 0:
            self.frames -= 1
            time.sleep(0.01)
            return True, np.zeros((48, 64, 3), np.uint8)
        if self.then == "block":
            self.unblock.wait(10)
        return False, None

    def release(self) -> None:
        self.released = True


def test_file_gives_every_frame_in_order(tmp_path):
    path = make_video(tmp_path / "in.mp4", n=12, fps=15)
    with open_source(path) as cap:
        assert isinstance(cap, VideoCapture) and not cap.live
        assert cap.fps == pytest.approx(15) and cap.frame_count == 12
        frames = list(cap)
    assert [f.index for f in frames] == list(range(12))
    assert [f.timestamp for f in frames] == pytest.approx([i / 15 for i in range(12)])
    assert all(f.image.shape == (120, 160, 3) for f in frames)
    backgrounds = [int(f.image[5, 5, 0]) for f in frames]  # background brightness encodes the frame index
    assert backgrounds == sorted(backgrounds) and backgrounds[-1] - backgrounds[0] > 25
    assert cap.dropped == 0


def test_slow_consumer_of_a_file_still_gets_every_frame(tmp_path):
    path = make_video(tmp_path / "in.mp4", n=20)
    with open_source(path, buffer=2) as cap:
        indices = []
        for frame in cap:
            time.sleep(0.01)
            indices.append(frame.index)
    assert indices == list(range(20))


def test_live_source_keeps_newest_frame_and_counts_drops(tmp_path):
    path = make_video(tmp_path / "in.mp4", n=30)
    with open_source(path, live=True) as cap:
        assert cap.live
        indices = []
        for frame in cap:
            indices.append(frame.index)
            time.sleep(0.05)  # much slower than decoding: stale frames must be skipped
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert cap.dropped > 0
    assert len(indices) + cap.dropped == 30


def test_missing_file_is_a_clear_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope.mp4")
    with pytest.raises(SourceError, match="folder"):
        open_source(tmp_path)
    assert time.monotonic() - start < 1


def test_file_that_is_not_a_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(SourceError, match="Cannot decode video"):
        open_source(bad)


@pytest.mark.parametrize("source", [97, "97"])
def test_missing_camera_is_a_clear_error_quickly(source):
    start = time.monotonic()
    with pytest.raises(SourceError, match="camera 97"):
        open_source(source, open_timeout=5)
    assert time.monotonic() - start < 5.5


def test_unreachable_stream_url_is_a_clear_error():
    start = time.monotonic()
    with pytest.raises(SourceError, match="stream|took longer"):
        open_source("rtsp://127.0.0.1:9/none", open_timeout=3)
    assert time.monotonic() - start < 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a POSIX named pipe")
def test_open_that_hangs_times_out(tmp_path):
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)  # opening it for reading blocks until someone writes: a stand-in for a hung driver
    start = time.monotonic()
    try:
        with pytest.raises(SourceError, match="took longer than 1 s"):
            open_source(fifo, open_timeout=1)
        assert time.monotonic() - start < 2
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # let the abandoned opener thread finish
        os.close(fd)


def test_camera_that_stops_mid_run_ends_cleanly(monkeypatch):
    camera = FakeCamera(frames=5, then="fail")
    monkeypatch.setattr(cv2, "VideoCapture", camera)
    with open_source(0) as cap:
        assert cap.live and cap.fps == 30
        frames = list(cap)
    assert 1 <= len(frames) <= 5 and len(frames) + cap.dropped == 5
    assert camera.released


def test_busy_camera_that_never_delivers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cv2, "VideoCapture", FakeCamera(frames=0, then="fail"))
    with open_source(0) as cap, pytest.raises(SourceError, match="busy"):
        cap.read()


def test_stalled_camera_raises_instead_of_hanging(monkeypatch):
    camera = FakeCamera(frames=3, then="block")
    monkeypatch.setattr(cv2, "VideoCapture", camera)
    start = time.monotonic()
    with open_source(0, read_timeout=0.5) as cap:
        got = 0
        with pytest.raises(SourceError, match="no frame for 0.5 s"):
            while cap.read() is not None:
                got += 1
    camera.unblock.set()
    assert got >= 1
    assert time.monotonic() - start < 5


def test_close_early_does_not_hang(tmp_path):
    cap = open_source(make_video(tmp_path / "in.mp4", n=30), buffer=2)
    assert cap.read().index == 0
    start = time.monotonic()
    cap.close()
    assert time.monotonic() - start < 1
    assert cap.read() is None


def test_iterable_of_frames_in_order_with_gray_and_bgra_converted():
    frames = moving_square_frames(3)
    frames[1] = cv2.cvtColor(frames[1], cv2.COLOR_BGR2GRAY)
    frames[2] = cv2.cvtColor(frames[2], cv2.COLOR_BGR2BGRA)
    cap = open_source(iter(frames), fps=10)
    assert isinstance(cap, FrameIterable)
    got = list(cap)
    assert [f.index for f in got] == [0, 1, 2]
    assert [f.timestamp for f in got] == pytest.approx([0, 0.1, 0.2])
    assert all(f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8 for f in got)


def test_iterable_with_a_bad_frame_names_it():
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)]
    cap = open_source(frames)
    cap.read()
    with pytest.raises(InvalidImageError, match="Frame 1"):
        cap.read()


@pytest.mark.parametrize("source", [np.zeros((8, 8, 3), np.uint8), 3.5, None, True])
def test_not_a_source(source):
    with pytest.raises(SourceError, match="Not a video source"):
        open_source(source)
