"""The video job: read → detect → optional ByteTrack → annotate → write video (+ JSONL), with a progress bar.

Decoding runs in the capture thread and drawing/encoding in a writer thread, so the detector is never
idle waiting for I/O. Outputs are written under a temporary name and renamed when the job succeeds.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np
import supervision as sv

from ovdet.media.capture import Source, open_source
from ovdet.media.draw import draw
from ovdet.errors import VideoOutputError
from ovdet.masks.rle import DATA_KEY as MASK_RLE_KEY
from ovdet.masks.rle import encode
from ovdet.util.progress import progress as progress_display
from ovdet.media.stream import Result, Tracker, detect_frames

if TYPE_CHECKING:
    from ovdet.detector import OVDetector


def detections_to_json(detections: sv.Detections) -> list[dict[str, Any]]:
    """One dict per detection: class, class_id, score, xyxy (pixels) and track_id (None when untracked); with masks
    (--masks) also "segmentation", the mask as a COCO RLE as in annotate's JSONL (ovdet.masks.rle)."""
    names = detections.data.get("class_name", [str(c) for c in detections.class_id])
    ids = detections.tracker_id if detections.tracker_id is not None else [None] * len(detections)
    if MASK_RLE_KEY in detections.data:
        masks: list[Any] = [dict(m) for m in detections.data[MASK_RLE_KEY]]
    elif detections.mask is not None:
        masks = [encode(m) for m in detections.mask]
    else:
        masks = [None] * len(detections)
    return [{"class": str(name), "class_id": int(cid), "score": round(float(score), 4),
             "xyxy": [round(float(v), 1) for v in box], "track_id": None if tid is None else int(tid),
             **({} if m is None else {"segmentation": m})}
            for name, cid, score, box, tid, m in zip(names, detections.class_id, detections.confidence,
                                                     detections.xyxy, ids, masks)]


class Annotator:
    """Boxes and "class #id score" labels (ovdet.media.draw), plus motion traces of tracked objects if asked."""

    def __init__(self, traces: bool = False, trace_seconds: float = 2.0, fps: float = 30.0):
        self._trace = sv.TraceAnnotator(trace_length=max(2, round(trace_seconds * fps)),
                                        color_lookup=sv.ColorLookup.TRACK) if traces else None

    def __call__(self, image: np.ndarray, detections: sv.Detections) -> np.ndarray:
        canvas = draw(image, detections)
        if self._trace is not None and detections.tracker_id is not None:
            canvas = self._trace.annotate(canvas, detections)
        return canvas


def open_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """An mp4v cv2.VideoWriter of this (width, height) and fps; VideoOutputError if it cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VideoOutputError(f"Cannot create the folder of {str(path)!r} ({exc}): use a writable folder.") from exc
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        writer.release()
        raise VideoOutputError(f"Cannot write video {str(path)!r}: use a writable folder and a .mp4 name.")
    return writer


@dataclass
class VideoReport:
    """What a video job did."""

    frames: int
    seconds: float
    out: Path | None
    jsonl: Path | None

    @property
    def fps(self) -> float:
        """Frames processed per second, end to end."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def process_video(detector: OVDetector, source: Source, out: str | Path | None = None, jsonl: str | Path | None = None,
                  *, track: bool = False, traces: bool = False, batch: int = 1, fps: float | None = None,
                  conf: float | None = None, progress: bool = True, **detect_kw: Any) -> VideoReport:
    """Detect in every frame of `source`; write the annotated video to `out` and/or one JSON line per frame.

    The output video keeps the input's size and fps. `track` adds ByteTrack ids (labels, JSONL
    `track_id`); `traces` draws their paths (and implies `track`). `batch` frames share one forward.
    """
    track = track or traces
    out_path = Path(out) if out is not None else None
    jsonl_path = Path(jsonl) if jsonl is not None else None
    start = time.perf_counter()
    frames = 0
    with open_source(source, fps=fps) as capture:
        rate = capture.fps or fps or 30.0
        tracker = Tracker(high_thresh=detector.conf if conf is None else conf, fps=rate) if track else None
        writer = _Writer(out_path, jsonl_path, rate, Annotator(traces, fps=rate))
        bar = progress_display(total=capture.frame_count, unit="frame", desc=Path(capture.name).name,
                               quiet=not progress)
        try:
            for result in detect_frames(detector, capture, tracker=tracker, batch=batch, conf=conf, **detect_kw):
                writer.put(result)
                frames += 1
                bar.update()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        writer.finish()
    return VideoReport(frames, time.perf_counter() - start, out_path, jsonl_path)


class _Writer:
    """Annotates and writes results in a background thread; outputs get their final names on finish()."""

    def __init__(self, out: Path | None, jsonl: Path | None, fps: float, annotate: Annotator):
        self._out, self._fps, self._annotate = out, fps, annotate
        self._parts = {p: p.with_name(f".{p.stem}.partial{p.suffix}") for p in (out, jsonl) if p is not None}
        self._video: cv2.VideoWriter | None = None
        self._lines: IO[str] | None = None
        if jsonl is not None:
            try:
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                self._lines = open(self._parts[jsonl], "w", encoding="utf-8")
            except OSError as exc:
                raise VideoOutputError(f"Cannot write {str(jsonl)!r} ({exc}): use a writable folder.") from exc
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ovdet-video-writer", daemon=True)
        self._thread.start()

    def put(self, result: Result) -> None:
        """Queue one result; raises the writer's error if it failed."""
        if self._offer(result):
            return
        self.abort()
        raise self._error or VideoOutputError("The video writer stopped unexpectedly.")

    def _run(self) -> None:
        try:
            while (result := self._queue.get()) is not None and not self._stop.is_set():
                self._write(result)
        except BaseException as exc:  # raised again in the main thread
            self._error = exc

    def _write(self, result: Result) -> None:
        frame, dets = result.frame, result.detections
        if self._lines is not None:
            record = {"frame": frame.index, "time": round(frame.timestamp, 4), "detections": detections_to_json(dets)}
            self._lines.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self._out is not None:
            if self._video is None:
                height, width = frame.image.shape[:2]
                self._video = open_writer(self._parts[self._out], self._fps, (width, height))
            self._video.write(self._annotate(frame.image, dets))

    def _offer(self, item: Result | None) -> bool:
        """Queue an item (None: stop) unless the writer thread has died; True once queued."""
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _close(self) -> None:
        self._offer(None)
        self._thread.join()
        if self._video is not None:
            self._video.release()
        if self._lines is not None:
            self._lines.close()

    def finish(self) -> None:
        """Write what is queued, then give every output its final name."""
        self._close()
        if self._error is None and self._out is not None and self._video is None:
            self._error = VideoOutputError("The source delivered no frame, so no video was written.")
        if self._error is not None:
            self.abort()
            raise self._error
        for final, part in self._parts.items():
            os.replace(part, final)

    def abort(self) -> None:
        """Stop without writing what is still queued and delete the partial outputs."""
        self._stop.set()
        self._close()
        for part in self._parts.values():
            if part.is_file():
                part.unlink()
