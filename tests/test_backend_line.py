"""Every command that runs a detector says on stderr, before its work, which backend runs and why (README: Backends);
commands whose stdout is data keep their summaries on stderr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ovdet.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--model", "demo", "--device", "cpu", "--classes", "red circle,blue square"]
# "ovdet: demo-world@<hash> on torch fp32, 2 threads, cpu (auto: ...)": what runs, threads, device and why
LINE = re.compile(r"^ovdet: demo-world@[0-9a-f]{16} on torch fp32, \d+ threads?, cpu \(.*\)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    assert main(["synth", str(root), "--train", "1", "--val", "3", "--colours", "red,blue", "--shapes", "circle,square", "--quiet"]) == 0
    return root / "data.yaml"


@pytest.mark.parametrize("command", ["detect", "annotate", "video", "webcam", "eval"])
def test_the_backend_line_comes_first_on_stderr(command, data, tmp_path, capsys):
    video = str(REPO / "samples" / "shapes.mp4")
    args = {
        "detect": ["detect", str(REPO / "samples" / "shapes.jpg")],
        "annotate": ["annotate", str(REPO / "samples" / "shapes"), "--out", str(tmp_path / "out")],
        "video": ["video", video, "--jsonl", str(tmp_path / "v.jsonl"), "--no-progress"],
        "webcam": ["webcam", "--source", video, "--no-window"],
        "eval": ["eval", str(data)],
    }[command]
    capsys.readouterr()
    assert main([*args, *DEMO]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines and LINE.match(lines[0]), err
    assert lines[0].endswith("($OVDET_BACKEND)")  # why: the suite sets OVDET_BACKEND=torch
    if command in ("video", "webcam"):  # the summary is on stderr; stdout holds only data (webcam: frame lines)
        assert re.search(r"^\d+ frames in ", err, re.M) and "frames in" not in out
        if command == "webcam":
            assert out and all(line.startswith("frame ") for line in out.splitlines())
        else:
            assert out == "" and f"wrote {tmp_path / 'v.jsonl'}" in err


@pytest.mark.parametrize("command", ["annotate", "video"])
def test_quiet_prints_nothing(command, tmp_path, capsys):
    args = {"annotate": ["annotate", str(REPO / "samples" / "shapes"), "--out", str(tmp_path / "out")],
            "video": ["video", str(REPO / "samples" / "shapes.mp4"), "--jsonl", str(tmp_path / "v.jsonl")]}[command]
    capsys.readouterr()
    assert main([*args, *DEMO, "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
