"""`ovdet annotate --precision int8` calibrates on the folder it annotates unless --calib names another."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ovdet.cli import main
from ovdet.detector import OVDetector

ROOT = Path(__file__).resolve().parents[1]


class Built(Exception):
    """Raised by the fake detector factory: the test only needs the options it was given."""


@pytest.fixture
def seen(monkeypatch):
    """The DetectorConfig the command builds its detector from (the build stops there)."""
    got = {}

    def from_config(cls, cfg):
        got["calib"], got["precision"] = cfg.calib, cfg.precision
        raise Built

    monkeypatch.setattr(OVDetector, "from_config", classmethod(from_config))
    return got


@pytest.mark.parametrize("extra, expected", [((), "SRC"), (("--calib", "CAL"), "CAL")])
def test_int8_calibrates_on_the_annotated_folder_by_default(tmp_path, seen, extra, expected):
    src = tmp_path / "images"
    shutil.copytree(ROOT / "samples" / "shapes", src)
    cal = tmp_path / "cal"
    argv = ["annotate", str(src), "--model", "demo", "--classes", "red circle", "--out", str(tmp_path / "out"),
            "--backend", "openvino", "--precision", "int8",
            *[str(cal) if a == "CAL" else a for a in extra]]
    with pytest.raises(Built):
        main(argv)
    assert seen["precision"] == "int8"
    assert seen["calib"] == str(src if expected == "SRC" else cal)


def test_other_precisions_keep_no_calibration_folder(tmp_path, seen):
    src = tmp_path / "images"
    shutil.copytree(ROOT / "samples" / "shapes", src)
    with pytest.raises(Built):
        main(["annotate", str(src), "--model", "demo", "--classes", "red circle", "--out", str(tmp_path / "out"),
              "--backend", "openvino", "--precision", "fp32"])
    assert seen["calib"] is None


def test_the_python_api_calibrates_on_the_annotated_folder_too(tmp_path, seen):
    from ovdet import annotate_folder

    src = tmp_path / "images"
    shutil.copytree(ROOT / "samples" / "shapes", src)
    with pytest.raises(Built):
        annotate_folder(src, "red circle", tmp_path / "out", model="demo", backend="openvino", precision="int8")
    assert seen["calib"] == str(src)
