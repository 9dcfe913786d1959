"""Detections over a stream of frames: capture → detect (batched for files) → optional ByteTrack."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from ovdet.media.capture import Capture, Frame, Source, open_source


class Tracker:
    """ByteTrack over `sv.Detections`: keeps the detections that belong to a track and sets `tracker_id`.

    Uses `trackers.ByteTrackTracker`, the ByteTrack that supervision points to since it moved out of the
    package. Boxes scoring at least `high_thresh` start tracks; weaker ones only extend existing tracks
    (so feed it detections down to `low_thresh`). A track lives `buffer_s` seconds without detections.
    """

    def __init__(self, high_thresh: float = 0.25, low_thresh: float = 0.1, min_iou: float = 0.1,
                 buffer_s: float = 1.0, fps: float = 30.0):
        self.low_thresh = min(low_thresh, high_thresh)
        self._tracker = ByteTrackTracker(lost_track_buffer=max(1, round(buffer_s * 30)), frame_rate=fps,
                                         track_activation_threshold=high_thresh, high_conf_det_threshold=high_thresh,
                                         minimum_consecutive_frames=1, minimum_iou_threshold=min_iou)

    def update(self, detections: sv.Detections, timestamp: float | None = None) -> sv.Detections:
        """Advance one frame (at `timestamp` seconds, else one frame period): the tracked detections."""
        tracked = self._tracker.update(detections, timestamp=timestamp)
        return tracked[tracked.tracker_id != -1]

    def reset(self) -> None:
        """Forget every track (e.g. after the class list changed) and restart the id counter."""
        self._tracker.reset()


@dataclass
class Result:
    """One processed frame: the frame, its detections and how long detection took (ms, per frame)."""

    frame: Frame
    detections: sv.Detections
    infer_ms: float


def detect_frames(detector: Any, capture: Capture, *, tracker: Tracker | None = None, batch: int = 1,
                  conf: float | None = None, **detect_kw: Any) -> Iterator[Result]:
    """Detect in every frame the capture delivers; `batch` frames per forward unless the source is live.

    The detector's class list is read per batch, so `set_classes` between frames applies to the next
    frame; the tracker is reset when the class list changes (class ids would mean something else).
    With a tracker, detection runs down to the tracker's low threshold and the tracker keeps its tracks.
    """
    conf = detector.conf if conf is None else conf
    det_conf = min(conf, tracker.low_thresh) if tracker is not None else conf
    size = 1 if capture.live else max(1, batch)
    previous: list[str] | None = None  # the class list of the previous batch
    frames: list[Frame] = []
    for frame in capture:
        frames.append(frame)
        if len(frames) >= size:
            previous = yield from _run_batch(detector, frames, tracker, previous, det_conf, detect_kw)
            frames = []
    if frames:
        yield from _run_batch(detector, frames, tracker, previous, det_conf, detect_kw)


def _run_batch(detector: Any, frames: list[Frame], tracker: Tracker | None, previous: list[str] | None,
               conf: float, detect_kw: dict[str, Any]) -> Generator[Result, None, list[str]]:
    classes = list(detector.classes)
    if tracker is not None and previous is not None and classes != previous:
        tracker.reset()
    start = time.perf_counter()
    all_dets = detector.detect_batch([f.image for f in frames], conf=conf, **detect_kw)
    infer_ms = (time.perf_counter() - start) * 1000 / len(frames)
    for frame, dets in zip(frames, all_dets):
        yield Result(frame, tracker.update(dets, frame.timestamp) if tracker is not None else dets, infer_ms)
    return classes


def stream(detector: Any, source: Source, track: bool = False, *, conf: float | None = None,
           batch: int = 1, live: bool | None = None, fps: float | None = None,
           read_timeout: float = 10.0, **detect_kw: Any) -> Iterator[tuple[np.ndarray, sv.Detections]]:
    """Yield (BGR frame, detections) for a video path, camera index, stream URL or iterable of frames.

    `track=True` adds ByteTrack ids (`detections.tracker_id`). `batch` frames share one forward for
    non-live sources; live sources always use the newest frame. Other keywords go to `detector.detect`.
    """
    with open_source(source, live=live, fps=fps, read_timeout=read_timeout) as capture:
        tracker = Tracker(high_thresh=detector.conf if conf is None else conf, fps=capture.fps or 30.0) \
            if track else None
        for result in detect_frames(detector, capture, tracker=tracker, batch=batch, conf=conf, **detect_kw):
            yield result.frame.image, result.detections
