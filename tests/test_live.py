"""Live loop driven by scripted frames, keys and terminal input; one real window under Xvfb when available."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import random_world_model
from test_capture import BlobDetector, make_video, moving_square_frames, video_props

from ovdet.cli import main
from ovdet.video.live import run_live

TESTS = Path(__file__).resolve().parent


class ScriptedDisplay:
    """A Display whose keys come from `script(display)`; it keeps every frame and title it was shown."""

    def __init__(self, script):
        self.script = script
        self.shown: list[tuple[np.ndarray, str]] = []
        self.polls = 0
        self.closed = False

    def show(self, image, title):
        self.shown.append((image.copy(), title))

    def key(self, delay_ms):
        self.polls += 1
        return self.script(self)

    def close(self):
        self.closed = True


def counting(frames, pulled: list[int]):
    """Yield frames, noting how many have been taken."""
    for i, frame in enumerate(frames):
        pulled.append(i)
        yield frame


def keys(plan: dict[int, str], then=lambda d: -1):
    """Key script: plan[poll number] → key; otherwise `then(display)`."""
    return lambda d: ord(plan[d.polls]) if d.polls in plan else then(d)


def test_scripted_session_pause_snapshot_record_classes_quit(tmp_path):
    det = BlobDetector()
    pulled: list[int] = []
    paused_pulls = []

    def after_plan(d):
        if d.polls in (5, 6):
            paused_pulls.append(len(pulled))
        if det.set_calls or d.polls > 300:
            return ord("q")
        time.sleep(0.005)
        return -1

    display = ScriptedDisplay(keys({3: " ", 7: " ", 8: "s", 9: "r", 14: "r", 15: "c"}, after_plan))
    lines: list[str] = []
    report = run_live(det, counting(moving_square_frames(400), pulled), display=display, out_dir=tmp_path,
                      ask=lambda: "cat, dog", echo=lines.append)

    assert paused_pulls == [3, 3]  # no frame is taken while paused
    assert report.frames == display.polls - 4 == len(pulled)  # polls 4-7 were paused
    assert det.set_calls == [["cat", "dog"]]
    assert report.class_changes == [["cat", "dog"]]
    assert display.shown[-1][1].endswith("cat, dog") and display.closed
    assert "FPS" in display.shown[0][1]
    assert (display.shown[0][0][9, 9] == 0).all()  # the FPS/latency box is drawn over the frame
    red = [((img[..., 2] > 200) & (img[..., 1] < 60)).sum() for img, _ in display.shown[:8]]
    assert red[3] > 50 and red[2] == 0  # "PAUSED" banner while paused (shown for polls 4-7)

    [snapshot] = report.snapshots
    assert snapshot.parent == tmp_path and snapshot.suffix == ".png"
    assert cv2.imread(str(snapshot)).shape == (120, 160, 3)
    [recording] = report.recordings
    assert recording.parent == tmp_path and recording.suffix == ".mp4"
    assert video_props(recording)[:3] == (5, 160, 120)  # frames of polls 10..14
    assert any("recording" in line for line in lines) and any("snapshot" in line for line in lines)


def test_source_that_ends_stops_the_loop_and_saves_the_recording(tmp_path):
    display = ScriptedDisplay(keys({2: "s"}))
    lines: list[str] = []
    record = tmp_path / "rec" / "live.mp4"
    report = run_live(BlobDetector(), moving_square_frames(12), display=display, record=record, echo=lines.append)
    assert report.frames == 12 and display.closed
    assert report.recordings == [record]
    assert video_props(record)[:3] == (12, 160, 120)
    assert report.snapshots == [record.with_name("live-snapshot.png")]  # next to the recording
    assert any("source ended" in line for line in lines)


def test_record_toggle_twice_makes_two_files(tmp_path):
    display = ScriptedDisplay(keys({1: "r", 3: "r", 4: "r", 6: "q"}))
    report = run_live(BlobDetector(), moving_square_frames(20), display=display, out_dir=tmp_path,
                      echo=lambda s: None)
    first, second = report.recordings
    assert first != second and first.exists() and second.exists()
    assert video_props(first)[0] == 2 and video_props(second)[0] == 2


@pytest.mark.parametrize("key", [ord("q"), 27], ids=["q", "Esc"])
def test_q_and_esc_quit(key):
    """README: keys q/Esc quit."""
    display = ScriptedDisplay(lambda d: key if d.polls == 4 else -1)
    report = run_live(BlobDetector(), moving_square_frames(50), display=display, echo=lambda s: None)
    assert report.frames == 4 and display.closed


def test_window_closed_by_user_quits():
    display = ScriptedDisplay(lambda d: -2 if d.polls == 4 else -1)
    report = run_live(BlobDetector(), moving_square_frames(50), display=display, echo=lambda s: None)
    assert report.frames == 4


def test_bad_class_input_keeps_current_classes():
    det = BlobDetector()
    lines: list[str] = []

    def script(d):
        if d.polls == 1:
            return ord("c")
        return ord("q") if any("unchanged" in line for line in lines) or d.polls > 300 else -1

    run_live(det, moving_square_frames(400), display=ScriptedDisplay(script), ask=lambda: "cup,,phone",
             echo=lines.append)
    assert det.classes == ["square"]
    assert any("classes unchanged" in line and "blank" in line for line in lines)


def test_headless_prints_detections_per_frame():
    lines: list[str] = []
    report = run_live(BlobDetector(), moving_square_frames(5), window=False, track=True, echo=lines.append)
    frames = [line for line in lines if line.startswith("frame ")]
    assert report.frames == 5 and len(frames) == 5
    assert frames[0].startswith("frame 0: 0 det")  # a track is confirmed on its second sighting
    assert all("square #0 0.90 [" in line for line in frames[1:])


def test_ctrl_c_stops_cleanly_and_keeps_the_recording(tmp_path):
    def frames():
        yield from moving_square_frames(3)
        raise KeyboardInterrupt

    lines: list[str] = []
    report = run_live(BlobDetector(), frames(), window=False, record=tmp_path / "r.mp4", echo=lines.append)
    assert report.frames == 3 and "interrupted" in lines
    assert video_props(tmp_path / "r.mp4")[0] == 3


def test_real_model_class_change_applies_on_next_frame(tiny_detector):
    tiny_detector.set_classes(["square", "circle"])
    seen: list[tuple[list[str], set[str]]] = []
    real = tiny_detector.detect_batch

    def spy(images, **kw):
        out = real(images, **kw)
        seen.append((tiny_detector.classes, {n for d in out for n in d.data["class_name"]}))
        return out

    tiny_detector.detect_batch = spy
    changed_at: list[int] = []

    def script(d):
        if d.polls == 1:
            return ord("c")
        if not changed_at and tiny_detector.classes == ["red car", "tree"]:
            changed_at.append(len(seen))
        return ord("q") if changed_at and len(seen) >= changed_at[0] + 2 or d.polls > 100 else -1

    report = run_live(tiny_detector, moving_square_frames(60), display=ScriptedDisplay(script), conf=0.01,
                      ask=lambda: "red car, tree", echo=lambda s: None)
    assert report.class_changes == [["red car", "tree"]]
    after = [names for classes, names in seen if classes == ["red car", "tree"]]
    assert len(after) >= 2 and set().union(*after) and set().union(*after) <= {"red car", "tree"}
    before = [names for classes, names in seen if classes == ["square", "circle"]]
    assert before and set().union(*before) <= {"square", "circle"}


def test_cli_webcam_headless_and_missing_camera(tmp_path, tiny_text_encoder, capsys):
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": random_world_model(), "train_args": {}, "ovdet_text_encoder": tiny_text_encoder.to_state()},
               ckpt)
    model = ["--model", str(ckpt), "--device", "cpu", "--imgsz", "160", "--conf", "0.05"]
    src = make_video(tmp_path / "cam.mp4", n=4)
    assert main(["webcam", "--source", str(src), "--classes", "cup,phone", "--no-window",
                 "--record", str(tmp_path / "rec.mp4"), *model]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("frame ")] == \
        [f"frame {i}" for i in range(4)]
    assert video_props(tmp_path / "rec.mp4")[0] == 4

    start = time.monotonic()
    assert main(["webcam", "--source", "97", "--classes", "cup", "--no-window", *model]) == 2
    assert "camera 97" in capsys.readouterr().err
    assert time.monotonic() - start < 15


def test_standalone_script_is_ovdet_webcam(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["webcam.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TESTS.parent / "scripts" / "webcam.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--no-window" in out and "--record" in out and "--classes" in out


WINDOW_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import supervision as sv
    from PIL import ImageGrab
    from ovdet.video.live import CvWindow, run_live

    class OneBox:  # the smallest detector the loop accepts (keeps torch out of this process)
        conf, classes = 0.25, ["square"]

        def detect_batch(self, images, **kw):
            return [sv.Detections(xyxy=np.array([[60, 40, 90, 70]], np.float32), confidence=np.array([0.9]),
                                  class_id=np.array([0]), data={"class_name": np.array(["square"])})
                    for _ in images]

    class GrabbingWindow(CvWindow):
        polls = 0

        def key(self, delay_ms):
            code = super().key(delay_ms)
            self.polls += 1
            if self.polls == 20:
                ImageGrab.grab(xdisplay=os.environ["DISPLAY"]).save(sys.argv[1])
                return ord("q")
            return code

    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:] = (0, 160, 0)  # BGR green
    frame[40:70, 60:90] = 255
    report = run_live(OneBox(), [frame.copy() for _ in range(200)], display=GrabbingWindow("ovdet-xvfb"),
                      echo=lambda s: None)
    print("frames", report.frames)
""")


def run_under_xvfb(script: str, *args: str, displays: range) -> subprocess.CompletedProcess:
    """Run the Python `script` in a fresh process on its own Xvfb screen (640×480, the first free display number
    of `displays`), with the Qt settings a real window needs; returns the finished process (exit code checked)."""
    display = next(n for n in displays if not Path(f"/tmp/.X11-unix/X{n}").exists()
                   and not Path(f"/tmp/.X{n}-lock").exists())
    server = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not Path(f"/tmp/.X11-unix/X{display}").exists():
            assert server.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.05)
        env = {**os.environ, "DISPLAY": f":{display}", "QT_QPA_PLATFORM": "xcb", "QT_QPA_FONTDIR": "/usr/share/fonts",
               "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)")
def test_real_window_under_xvfb(tmp_path):
    shot = tmp_path / "screen.png"
    run = run_under_xvfb(WINDOW_SCRIPT, str(shot), displays=range(90, 140))
    assert "frames 20" in run.stdout
    screen = cv2.imread(str(shot))
    assert screen is not None and screen.shape == (480, 640, 3)
    green = np.all(np.abs(screen.astype(int) - (0, 160, 0)) < 30, axis=2)
    assert green.sum() > 0.5 * 160 * 120  # the frame's green background is on screen, unscaled
