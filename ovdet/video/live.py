"""The interactive live loop: detect on a camera or stream, show it in a window, react to keys.

Keys: q/Esc quit, space pause, s snapshot (PNG next to the recording), r start/stop recording,
c type new classes in the terminal (applied on the next frame). Drag a box with the mouse to add what is in it as
a new class at once (an exemplar, ovdet.text.exemplars), n to name that class in the terminal, u to undo the last
class change. Headless mode prints detections.
The window, the key source and the terminal prompt are injectable, so tests can script a session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from ovdet.media.capture import Capture, Source, open_source
from ovdet.errors import ClassSpecError
from ovdet.options import LIVE_KEYS_HELP as HELP  # defined there so that the CLI parser needs no OpenCV
from ovdet.media.stream import Result, Tracker, detect_frames
from ovdet.video.job import Annotator, open_writer
from ovdet.video.live_classes import DRAG_HELP, Box, LiveClasses, Prompt, ordered

if TYPE_CHECKING:
    from ovdet.detector import OVDetector

KEY_QUIT = (ord("q"), 27)
KEY_PAUSE, KEY_SNAPSHOT, KEY_RECORD, KEY_CLASSES = ord(" "), ord("s"), ord("r"), ord("c")
KEY_NAME, KEY_UNDO = ord("n"), ord("u")


class Display(Protocol):
    """Where frames are shown and keys come from (a cv2 window, or a script in tests)."""

    def show(self, image: np.ndarray, title: str) -> None: ...

    def key(self, delay_ms: int) -> int:
        """The key pressed within `delay_ms` (its code, -1 for none); -2 once the window was closed."""
        ...

    def close(self) -> None: ...

    # Optional: `drag() -> (box being dragged or None, box whose drag ended since the last call or None)`, in image
    # pixels (x1, y1, x2, y2); a display without it offers no box-drag.


class CvWindow:
    """A resizable cv2.imshow window whose title shows the live FPS; left-drag draws a box (see `drag`)."""

    def __init__(self, name: str = "ovdet"):
        self.name = name
        self._opened = False
        self._anchor: tuple[int, int] | None = None
        self._current: Box | None = None
        self._done: Box | None = None

    def show(self, image: np.ndarray, title: str) -> None:
        if not self._opened:
            cv2.namedWindow(self.name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
            cv2.resizeWindow(self.name, image.shape[1], image.shape[0])
            cv2.setMouseCallback(self.name, self._on_mouse)
            self._opened = True
        cv2.imshow(self.name, image)
        cv2.setWindowTitle(self.name, title)

    def _on_mouse(self, event: int, x: int, y: int, flags: int, param: Any) -> None:
        """OpenCV's mouse callback (runs inside waitKey); x, y are image pixels."""
        if event == cv2.EVENT_LBUTTONDOWN:
            self._anchor, self._current = (x, y), None
        elif event == cv2.EVENT_MOUSEMOVE and self._anchor is not None:
            self._current = ordered(*self._anchor, x, y)
        elif event == cv2.EVENT_LBUTTONUP and self._anchor is not None:
            self._done, self._anchor, self._current = ordered(*self._anchor, x, y), None, None

    def drag(self) -> tuple[Box | None, Box | None]:
        """(the box being dragged now, the box of a drag that ended since the last call), image pixels."""
        done, self._done = self._done, None
        return self._current, done

    def key(self, delay_ms: int) -> int:
        code = cv2.waitKey(max(1, delay_ms))
        if self._opened and cv2.getWindowProperty(self.name, cv2.WND_PROP_VISIBLE) < 1:
            return -2
        return -1 if code == -1 else code & 0xFF

    def close(self) -> None:
        if self._opened:
            cv2.destroyWindow(self.name)
            cv2.waitKey(1)
            self._opened = False


class Recorder:
    """Writes annotated frames to a video; on live sources the fps is measured over the first frames."""

    def __init__(self, path: Path, fps: float | None, probe: int = 15):
        self.path, self.frames = path, 0
        self._fps, self._probe = fps, probe
        self._pending: list[tuple[np.ndarray, float]] = []
        self._writer: cv2.VideoWriter | None = None

    def write(self, image: np.ndarray, captured: float) -> None:
        self.frames += 1
        if self._writer is not None:
            self._writer.write(image)
            return
        self._pending.append((image, captured))
        if self._fps is not None or len(self._pending) >= self._probe:
            self._flush()

    def _flush(self) -> None:
        times = [t for _, t in self._pending]
        span = times[-1] - times[0]
        fps = self._fps or (min(60.0, (len(times) - 1) / span) if span > 0 else 30.0)
        height, width = self._pending[0][0].shape[:2]
        self._writer = open_writer(self.path, fps, (width, height))
        for image, _ in self._pending:
            self._writer.write(image)
        self._pending = []

    def close(self) -> None:
        if self._writer is None and self._pending:
            self._flush()
        if self._writer is not None:
            self._writer.release()


@dataclass
class LiveReport:
    """What a live session did."""

    frames: int = 0
    dropped: int = 0
    seconds: float = 0.0
    snapshots: list[Path] = field(default_factory=list)
    recordings: list[Path] = field(default_factory=list)
    class_changes: list[list[str]] = field(default_factory=list)


def _ask_classes() -> str:
    return input("new classes (comma-separated, empty keeps the current ones): ")


def run_live(detector: OVDetector, source: Source = 0, *, window: bool = True, record: str | Path | None = None,
             out_dir: str | Path = ".", track: bool = False, conf: float | None = None,
             display: Display | None = None, ask: Callable[[], str] = _ask_classes,
             echo: Callable[[str], None] = print, live: bool | None = None, read_timeout: float = 10.0,
             ask_name: Callable[[str], str] | None = None, data: Callable[[str], None] | None = None,
             **detect_kw: Any) -> LiveReport:
    """Run detection on a live source until it ends or the user quits; returns what was done.

    `window=False` runs headless and prints one line of detections per frame (Ctrl-C stops).
    `record` starts recording to that path at once; snapshots and later recordings go next to it
    (or into `out_dir`). `display`, `ask` (new classes), `ask_name` (the name of a class added by dragging a
    box) and `echo` replace the cv2 window, the terminal prompts and printing, e.g. to script a session in tests.
    `data` receives the headless detection lines (default: `echo`), so a CLI can keep them apart from messages.
    """
    with open_source(source, live=live, read_timeout=read_timeout) as capture:
        session = _Session(detector, capture, display=(display or CvWindow()) if window else None,
                           record=Path(record) if record is not None else None, out_dir=Path(out_dir),
                           ask=ask, echo=echo, ask_name=ask_name, data=data)
        tracker = Tracker(high_thresh=detector.conf if conf is None else conf, fps=capture.fps or 30.0) \
            if track else None
        results = detect_frames(detector, capture, tracker=tracker, conf=conf, **detect_kw)
        try:
            session.run(results)
        except KeyboardInterrupt:
            echo("interrupted")
        finally:
            session.close()
            results.close()
    return session.report


class _Session:
    """State of one live run: pause, recording, snapshots, FPS meter, pending class change."""

    def __init__(self, detector: OVDetector, capture: Capture, *, display: Display | None, record: Path | None,
                 out_dir: Path, ask: Callable[[], str], echo: Callable[[str], None],
                 ask_name: Callable[[str], str] | None = None, data: Callable[[str], None] | None = None):
        self.detector, self.capture, self.display, self.echo = detector, capture, display, echo
        self.data = data or echo
        self.dragging: Box | None = None
        self.raw: np.ndarray | None = None  # the frame shown, without boxes: what a dragged box is cut from
        self.base = record or out_dir / f"ovdet-live-{datetime.now():%Y%m%d-%H%M%S}.mp4"
        self.prompt = Prompt(ask)
        self.annotate = Annotator()
        self.report = LiveReport()
        self.classes = LiveClasses(detector, echo, self.report.class_changes,
                                   **({"ask_name": ask_name} if ask_name is not None else {}))
        self.recorder: Recorder | None = None
        self.paused = False
        self.fps = 0.0
        self._last_tick: float | None = None
        self._start = time.monotonic()
        if record is not None:
            self._start_recording(record)

    def run(self, results: Any) -> None:
        shown: np.ndarray | None = None
        clean: np.ndarray | None = None
        if self.display is not None:
            self.echo(HELP + (f" · {DRAG_HELP}" if hasattr(self.display, "drag") else ""))
        while True:
            self._apply_class_change()
            self.classes.apply_name()
            if not self.paused or shown is None:
                result = next(results, None)
                if result is None:
                    self.echo(f"{self.capture.name}: source ended")
                    return
                clean = self.annotate(result.frame.image, result.detections)
                self.raw = result.frame.image
                self._tick(result)
                if self.recorder is not None:
                    self.recorder.write(clean, result.frame.captured)
                if self.display is None:
                    self.data(_describe(result))
                    continue
                shown = self._overlay(clean, result)
            assert self.display is not None and clean is not None
            image = shown if not self.paused else _banner(shown, "PAUSED")
            if self.dragging is not None:
                image = image.copy()
                cv2.rectangle(image, self.dragging[:2], self.dragging[2:], (0, 255, 255), 2)
            self.display.show(image, self._title())
            if not self._handle_key(self.display.key(30 if self.paused else 1), clean):
                return
            self._handle_drag()

    def _tick(self, result: Result) -> None:
        now = time.monotonic()
        if self._last_tick is not None:
            rate = 1.0 / max(now - self._last_tick, 1e-6)
            self.fps = rate if self.fps == 0 else 0.9 * self.fps + 0.1 * rate
        self._last_tick = now
        self.report.frames += 1
        self.report.dropped = self.capture.dropped

    def _handle_key(self, key: int, clean: np.ndarray) -> bool:
        """React to one key; False means quit."""
        if key == -2 or key in KEY_QUIT:
            return False
        if key == KEY_PAUSE:
            self.paused = not self.paused
        elif key == KEY_SNAPSHOT:
            path = _free_path(self.base.with_name(f"{self.base.stem}-snapshot.png"))
            path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), clean):
                self.echo(f"could not write snapshot {path}")
            else:
                self.report.snapshots.append(path)
                self.echo(f"snapshot: {path}")
        elif key == KEY_RECORD:
            if self.recorder is not None:
                self._stop_recording()
            else:
                self._start_recording(_free_path(self.base))
        elif key == KEY_CLASSES:
            if self.prompt.start():
                self.echo(f"current classes: {', '.join(self.detector.classes)}")
        elif key == KEY_NAME:
            self.classes.start_naming()
        elif key == KEY_UNDO:
            self.classes.undo()
        return True

    def _handle_drag(self) -> None:
        """Follow the mouse: the box being dragged is drawn; a finished one becomes a class at once."""
        drag = getattr(self.display, "drag", None)
        if drag is None:
            return
        self.dragging, done = drag()
        if done is not None and self.raw is not None:
            self.classes.add_box(self.raw, done)

    def _apply_class_change(self) -> None:
        answer = self.prompt.poll()
        if answer is None or not answer.strip():
            return
        names = [name.strip() for name in answer.split(",")]
        before = self.classes.current()
        try:
            self.detector.set_classes(names)
        except ClassSpecError as exc:
            self.echo(f"classes unchanged: {exc}")
            return
        self.classes.history.append(before)  # u undoes it like a change made in the window
        self.report.class_changes.append(names)
        self.echo(f"classes: {', '.join(self.detector.classes)}")

    def _start_recording(self, path: Path) -> None:
        self.recorder = Recorder(path, None if self.capture.live else self.capture.fps)
        self.report.recordings.append(path)
        self.echo(f"recording: {path}")

    def _stop_recording(self) -> None:
        assert self.recorder is not None
        self.recorder.close()
        self.echo(f"saved {self.recorder.frames} frames: {self.recorder.path}")
        self.recorder = None

    def _title(self) -> str:
        return f"ovdet · {self.fps:.1f} FPS · {', '.join(self.detector.classes)}"

    def _overlay(self, image: np.ndarray, result: Result) -> np.ndarray:
        latency = (time.monotonic() - result.frame.captured) * 1000
        lines = [f"{self.fps:.1f} FPS  infer {result.infer_ms:.0f} ms  latency {latency:.0f} ms",
                 f"dropped {self.capture.dropped}  {'REC' if self.recorder is not None else ''}".rstrip()]
        return _text_box(image.copy(), lines)

    def close(self) -> None:
        if self.recorder is not None:
            self._stop_recording()
        if self.display is not None:
            self.display.close()
        self.report.seconds = time.monotonic() - self._start
        self.report.dropped = self.capture.dropped


def _describe(result: Result) -> str:
    """One headless line: frame, timing and every detection."""
    dets = result.detections
    names = dets.data.get("class_name", [str(c) for c in dets.class_id])
    ids = dets.tracker_id if dets.tracker_id is not None else [None] * len(dets)
    items = [f"{name}{'' if tid is None else f' #{int(tid)}'} {score:.2f} [{' '.join(f'{v:.0f}' for v in box)}]"
             for name, tid, score, box in zip(names, ids, dets.confidence, dets.xyxy)]
    return f"frame {result.frame.index}: {len(dets)} det, {result.infer_ms:.0f} ms" + \
        (": " + "; ".join(items) if items else "")


def _free_path(path: Path) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`… : the first that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _text_box(image: np.ndarray, lines: list[str], origin: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Draw lines of white text on a dark box in the top-left corner (in place), sized to the frame."""
    scale, thick, pad = min(1.0, max(0.35, image.shape[1] / 1280)), 1, 4
    sizes = [cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0] for line in lines]
    line_h = max(h for _, h in sizes) + 2 * pad
    width = max(w for w, _ in sizes) + 2 * pad
    x, y = origin
    cv2.rectangle(image, (x, y), (x + width, y + line_h * len(lines)), (0, 0, 0), -1)
    for i, line in enumerate(lines):
        cv2.putText(image, line, (x + pad, y + (i + 1) * line_h - pad), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thick, cv2.LINE_AA)
    return image


def _banner(image: np.ndarray, text: str) -> np.ndarray:
    """A copy with `text` in large letters in the middle."""
    out = image.copy()
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.2, 2)
    org = ((out.shape[1] - w) // 2, (out.shape[0] + h) // 2)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 255), 2, cv2.LINE_AA)
    return out
