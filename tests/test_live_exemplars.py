"""Live window: a box dragged on the picture becomes a class at once, n names it, u undoes; the drag itself is
followed on a real cv2 window under Xvfb (mouse events sent through the XTest extension)."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
import supervision as sv

from test_live import run_under_xvfb

from ovdet.jobs.synth import WorldSpec, image_rng, render
from ovdet.video.live import run_live
from ovdet.weights.registry import DEMO_FILE



class DragDisplay:
    """A Display whose keys and drags come from a script: `script(display)` → (key, finished drag box or None)."""

    def __init__(self, script):
        self.script, self.polls, self.shown = script, 0, []
        self._done = None

    def show(self, image, title):
        self.shown.append((image.copy(), title))

    def key(self, delay_ms):
        self.polls += 1
        key, self._done = self.script(self)
        return key

    def drag(self):
        done, self._done = self._done, None
        return None, done

    def close(self):
        pass


@pytest.mark.skipif(not DEMO_FILE.is_file(), reason="the demo model is absent")
def test_drag_adds_a_class_n_names_it_u_undoes(monkeypatch):
    from ovdet import OVDetector

    image, boxes, ids = render(image_rng(2718, "val", 1), WorldSpec())
    target = boxes[0]
    det = OVDetector("demo", device="cpu", backend="torch")
    det.set_classes(["red circle"])
    found: list[tuple[list[str], set[str]]] = []
    real = det.detect_batch

    def spy(images, **kw):
        out = real(images, **kw)
        hits = {n for d in out for n, b in zip(d.data["class_name"], d.xyxy)
                if sv.box_iou_batch(b[None], target[None])[0, 0] > 0.5}
        found.append((list(det.classes), hits))
        return out

    monkeypatch.setattr(det, "detect_batch", spy)
    steps = iter(["drag", "small", "name", "undo", "undo", "quit"])
    step = [next(steps), 0]

    def script(display):
        what = step[0]
        step[1] += 1
        if step[1] < 3:  # a few frames between steps, so that each change is detected
            return -1, None
        step[:] = [next(steps, "quit"), 0]
        if what == "drag":
            return -1, tuple(int(round(v)) for v in target)
        if what == "small":
            return -1, (5, 5, 7, 40)  # a click more than a box: ignored
        return {"name": ord("n"), "undo": ord("u"), "quit": ord("q")}[what], None

    names = iter(["zorblax"])
    lines: list[str] = []
    report = run_live(det, [image.copy() for _ in range(300)], display=DragDisplay(script), conf=0.25,
                      echo=lines.append, ask_name=lambda current: next(names))
    assert report.class_changes[:2] == [["red circle", "object 1"], ["red circle", "zorblax"]]
    assert report.class_changes[2:] == [["red circle", "object 1"], ["red circle"]]
    assert any(classes == ["red circle", "object 1"] and "object 1" in hits for classes, hits in found)
    assert any(classes == ["red circle", "zorblax"] and "zorblax" in hits for classes, hits in found)
    assert det.classes == ["red circle"]
    assert any("new class 'object 1'" in line for line in lines) and any("now 'zorblax'" in line for line in lines)


def test_naming_or_undo_with_nothing_to_act_on_says_so():
    class Names:
        conf, classes, set_calls = 0.25, ["cup"], []

        def detect_batch(self, images, **kw):
            return [sv.Detections.empty() for _ in images]

        def set_classes(self, classes, **kw):
            self.set_calls.append(classes)

    keys = iter([ord("n"), ord("u"), ord("q")])
    lines: list[str] = []
    run_live(Names(), [np.zeros((40, 40, 3), np.uint8)] * 10, display=DragDisplay(lambda d: (next(keys), None)),
             echo=lines.append)
    assert "no class to name: drag a box around something first" in lines and "nothing to undo" in lines
    assert Names.set_calls == []


DRAG_SCRIPT = textwrap.dedent("""
    import ctypes
    import time

    import cv2
    import numpy as np
    from ovdet.video.live import CvWindow

    x11, xtst = ctypes.CDLL("libX11.so.6"), ctypes.CDLL("libXtst.so.6")
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XFlush.argtypes = [ctypes.c_void_p]
    xtst.XTestFakeMotionEvent.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ulong]
    xtst.XTestFakeButtonEvent.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_ulong]
    dpy = x11.XOpenDisplay(None)
    window = CvWindow("ovdet-drag")
    frame = np.zeros((120, 160, 3), np.uint8)

    def pump(n=5):
        for _ in range(n):
            window.show(frame, "drag")
            window.key(10)

    def until(ready, seconds=20.0):
        # a loaded machine maps the window and delivers X events late: pump the GUI loop until they have arrived
        deadline = time.monotonic() + seconds
        while not ready() and time.monotonic() < deadline:
            pump(1)

    rects = []
    def placed():  # the window is on screen, at its frame's size, and has stopped moving
        rects.append(cv2.getWindowImageRect("ovdet-drag"))
        return len(rects) > 5 and rects[-1][2:] == (160, 120) and len(set(rects[-5:])) == 1

    pump(20)
    until(placed)
    left, top, _, _ = rects[-1]

    def move(x, y, ready=lambda: True):
        xtst.XTestFakeMotionEvent(dpy, -1, left + x, top + y, 0)
        x11.XFlush(dpy)
        pump()
        until(ready)

    def button(down, ready):
        xtst.XTestFakeButtonEvent(dpy, 1, 1 if down else 0, 0)
        x11.XFlush(dpy)
        pump()
        until(ready)

    move(90, 80)
    button(True, lambda: window._anchor is not None)
    move(60, 50, lambda: window._current is not None)
    move(20, 30, lambda: window._current is not None and window._current[:2] == (20, 30))
    print("dragging", window.drag())
    button(False, lambda: window._done is not None)
    print("done", window.drag())
    print("after", window.drag())
""")


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)")
def test_real_window_follows_a_mouse_drag_under_xvfb():
    lines = run_under_xvfb(DRAG_SCRIPT, displays=range(140, 190)).stdout.splitlines()
    # dragged from the bottom-right corner up-left: the box is given top-left first, in image pixels
    assert "dragging ((20, 30, 90, 80), None)" in lines
    assert "done (None, (20, 30, 90, 80))" in lines and "after (None, None)" in lines
