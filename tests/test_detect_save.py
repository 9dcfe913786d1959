"""`ovdet detect --save DIR`: each annotated copy under its input's own name and suffix, clashes refused up front."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2

from ovdet.cli import main

SHAPES = Path(__file__).resolve().parents[1] / "samples" / "shapes.jpg"


def test_inputs_keep_their_names_and_suffixes_and_the_command_says_where(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(SHAPES, tmp_path / "a" / "shapes.jpg")
    cv2.imwrite(str(tmp_path / "b" / "shapes.png"), cv2.imread(str(SHAPES)))
    out = tmp_path / "out"
    assert main(["detect", str(tmp_path / "a" / "shapes.jpg"), str(tmp_path / "b" / "shapes.png"), "--model", "demo",
                 "--classes", "red circle", "--save", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shapes.jpg", "shapes.png"]
    png = cv2.imread(str(out / "shapes.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.shape == cv2.imread(str(SHAPES)).shape
    assert (out / "shapes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG is saved as a PNG
    assert f"ovdet: saved 2 annotated images to {out}" in capsys.readouterr().err


def test_two_inputs_with_one_name_are_refused_before_anything_runs(tmp_path, capsys):
    for folder in ("a", "c"):
        (tmp_path / folder).mkdir()
        shutil.copy(SHAPES, tmp_path / folder / "shapes.jpg")
    out = tmp_path / "out"
    assert main(["detect", str(tmp_path / "a" / "shapes.jpg"), str(tmp_path / "c" / "shapes.jpg"), "--model",
                 "demo", "--classes", "red circle", "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert "would both be saved as shapes.jpg" in err and "rename one" in err
    assert not out.exists()
