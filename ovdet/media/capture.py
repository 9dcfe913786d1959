"""Frames from a video file, camera, stream URL or iterable, decoded in a background thread.

Files (and iterables) deliver every frame in order. Live sources (cameras, RTSP/HTTP streams) keep only the
newest frame, so a slow consumer never falls behind; the frames it skipped are counted in `dropped`.
Opening and reading use timeouts: a missing, busy or stalled source raises `SourceError`, it never hangs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ovdet.errors import InvalidImageError, SourceError

Source = str | Path | int | Iterable[np.ndarray]
_END = object()  # end-of-source marker


@dataclass
class Frame:
    """One decoded BGR frame: its index in the source, its time in seconds, and when it was read."""

    image: np.ndarray
    index: int
    timestamp: float
    captured: float  # time.monotonic() when the reader got it, to measure latency


class Capture:
    """Common interface of every source: iterate for `Frame`s, then `close()` (or use `with`)."""

    name: str = ""
    fps: float | None = None  # frames per second the source declares; None when unknown
    frame_count: int | None = None  # frames in a file; None for live sources and iterables
    live: bool = False
    dropped: int = 0  # live frames overwritten before the consumer took them

    def read(self) -> Frame | None:
        """The next frame, or None when the source has ended."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the source; safe to call more than once."""

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_source(source: Source, *, live: bool | None = None, fps: float | None = None, buffer: int = 8,
                open_timeout: float = 10.0, read_timeout: float = 10.0) -> Capture:
    """Open a video path, camera index (int or digit string), stream URL, or iterable of BGR frames.

    `live` overrides the guess (cameras and endless streams are live); `fps` sets the rate of an iterable.
    """
    if isinstance(source, bool):
        raise SourceError(f"Not a video source: {source!r}. Give a video path, camera index, URL or frames.")
    if isinstance(source, int) or (isinstance(source, str) and source.strip().isdigit()):
        index = int(source)
        return VideoCapture(index, name=f"camera {index}", live=True if live is None else live, buffer=buffer,
                            open_timeout=open_timeout, read_timeout=read_timeout)
    if isinstance(source, str) and "://" in source:
        return VideoCapture(source, name=source, live=live, buffer=buffer, open_timeout=open_timeout,
                            read_timeout=read_timeout)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists() or path.is_dir():
            what = "is a folder, not a video file" if path.is_dir() else "does not exist"
            raise SourceError(f"Video {str(path)!r} {what}: check the path (a camera is a number such as 0).")
        return VideoCapture(str(path), name=str(path), live=bool(live), buffer=buffer,
                            open_timeout=open_timeout, read_timeout=read_timeout)
    if isinstance(source, np.ndarray) or not isinstance(source, Iterable):
        raise SourceError(f"Not a video source: {type(source).__name__}. Give a video path, camera index, "
                          "stream URL, or an iterable of BGR frames (use detect() for a single image).")
    return FrameIterable(source, fps=fps)


class FrameIterable(Capture):
    """Frames from a Python iterable, in order, in the caller's thread (no decoding to hide)."""

    def __init__(self, frames: Iterable[np.ndarray], fps: float | None = None):
        self.name = f"<{type(frames).__name__}>"
        self.fps = fps
        self._frames = iter(frames)
        self._index = 0
        self._start = time.monotonic()

    def read(self) -> Frame | None:
        image = next(self._frames, _END)
        if image is _END:
            return None
        index, self._index = self._index, self._index + 1
        now = time.monotonic()
        stamp = index / self.fps if self.fps else now - self._start
        return Frame(as_bgr(image, index), index, stamp, now)

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()


def as_bgr(image: Any, index: int) -> np.ndarray:
    """A 3-channel BGR uint8 view of a frame (gray and BGRA converted); clear error for anything else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = type(image).__name__ if not isinstance(image, np.ndarray) else f"array of {image.dtype}"
        raise InvalidImageError(f"Frame {index} is a {kind}: frames must be uint8 BGR arrays (H, W, 3).")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise InvalidImageError(f"Frame {index} has shape {image.shape}: frames must be (H, W, 3) BGR arrays.")
    return image


class VideoCapture(Capture):
    """cv2.VideoCapture read by a daemon thread; every frame for files, the newest frame for live sources."""

    def __init__(self, source: str | int, *, name: str, live: bool | None, buffer: int = 8,
                 open_timeout: float = 10.0, read_timeout: float = 10.0):
        self.name = name
        self.read_timeout = read_timeout
        self._cap = _open_with_timeout(source, name, open_timeout, read_timeout)
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(self._cap.get(cv2.CAP_PROP_FPS))
        self.fps = fps if 0 < fps < 1000 else None
        self.live = count <= 0 if live is None else live  # endless streams report no frame count
        self.frame_count = None if self.live or count <= 0 else count
        self.dropped = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, buffer))
        self._cond = threading.Condition()
        self._newest: Frame | object | None = None  # live mode: the one slot the reader overwrites
        self._thread = threading.Thread(target=self._run, name=f"ovdet-capture[{name}]", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        index = 0
        try:
            while not self._stop.is_set():
                ok, image = self._cap.read()
                now = time.monotonic()
                if not ok or image is None:
                    if self.live and index == 0:
                        raise SourceError(f"{self.name} opened but delivered no frame: it may be busy in another "
                                          "program or unplugged. Close other apps using it and try again.")
                    break
                if self.live:
                    stamp = now - start
                elif self.fps:
                    stamp = index / self.fps
                else:
                    stamp = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                self._deliver(Frame(image, index, stamp, now))
                index += 1
        except BaseException as exc:  # handed to the consumer, which raises it
            self._error = exc
        finally:
            self._deliver(_END)

    def _deliver(self, item: Frame | object) -> None:
        if self.live:
            with self._cond:
                if isinstance(self._newest, Frame):
                    self.dropped += 1
                if self._newest is not _END:
                    self._newest = item
                self._cond.notify_all()
            return
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return

    def read(self) -> Frame | None:
        """The next frame (files) or the newest one (live); None at the end; SourceError if it stalls."""
        if self._stop.is_set():
            return None
        if self.live:
            with self._cond:
                if not self._cond.wait_for(lambda: self._newest is not None, timeout=self.read_timeout):
                    self._stalled()
                item, self._newest = self._newest, (None if self._newest is not _END else _END)
        else:
            try:
                item = self._queue.get(timeout=self.read_timeout)
            except queue.Empty:
                self._stalled()
        if item is _END:
            self._stop.set()
            if self._error is not None:
                raise self._error
            return None
        return item  # type: ignore[return-value]

    def _stalled(self) -> None:
        self._stop.set()  # the reader is stuck inside cv2; close() will not wait for it
        raise SourceError(f"{self.name} delivered no frame for {self.read_timeout:g} s: it stopped or stalled "
                          "(unplugged camera, dead stream?). Check the source and try again.")

    def close(self) -> None:
        stuck = self._stop.is_set() and self._thread.is_alive()
        self._stop.set()
        self._thread.join(timeout=0 if stuck else 1.0)
        if not self._thread.is_alive():
            self._cap.release()  # a reader stuck inside read() keeps it; the daemon thread dies with us


def _open_with_timeout(source: str | int, name: str, open_timeout: float, read_timeout: float) -> cv2.VideoCapture:
    """cv2.VideoCapture opened in a helper thread so that a hanging driver or server cannot block us."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            if isinstance(source, str) and "://" in source:
                params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout * 1000),
                          cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]
                result["cap"] = cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
            else:
                result["cap"] = cv2.VideoCapture(source)
        except cv2.error as exc:
            result["error"] = exc

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # our message replaces OpenCV's noise
    try:
        opener = threading.Thread(target=target, name=f"ovdet-open[{name}]", daemon=True)
        opener.start()
        opener.join(open_timeout)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if opener.is_alive():
        raise SourceError(f"Opening {name} took longer than {open_timeout:g} s: check that the camera or "
                          "server is reachable, or raise the timeout.")
    cap = result.get("cap")
    if cap is None or not cap.isOpened():
        if cap is not None:
            cap.release()
        raise SourceError(_open_failure(source, name, result.get("error")))
    return cap


def _open_failure(source: str | int, name: str, error: BaseException | None) -> str:
    detail = f" ({error})" if error else ""
    if isinstance(source, int):
        return (f"Cannot open {name}{detail}: no such camera, or it is busy. Try another index (--source 1), "
                "check `ls /dev/video*`, and close other programs that use the camera.")
    if "://" in str(source):
        return f"Cannot open stream {name}{detail}: check the URL, credentials and that the server is up."
    return f"Cannot decode video {name}{detail}: the file is corrupt or not a video format OpenCV can read."
