"""samples/: every file is documented with source and licence, copies match their packages, all of it loads."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
VIDEO_SUFFIXES = {".mp4"}
CLASS_SUFFIXES = {".yaml", ".yml"}
MAX_FILE_BYTES = 5 * 1024 * 1024


def sample_files() -> list[Path]:
    return sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p != SAMPLES / "README.md")


def readme_rows() -> dict[str, list[str]]:
    """Table rows of samples/README.md whose first cell is a `backticked` file name: name -> cells."""
    rows: dict[str, list[str]] = {}
    for line in (SAMPLES / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([^`]+)`", cells[0]) if line.lstrip().startswith("|") else None
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is listed twice in samples/README.md"
            rows[match.group(1)] = cells
    return rows


def of_kind(suffixes: set[str]) -> list[Path]:
    return [p for p in sample_files() if p.suffix.lower() in suffixes]


def test_samples_has_each_kind_of_input():
    assert len(of_kind(IMAGE_SUFFIXES)) >= 4
    assert of_kind(VIDEO_SUFFIXES)
    assert {p.stem for p in of_kind(CLASS_SUFFIXES)} >= {"street", "warehouse_safety", "retail_shelf"}
    unknown = [p for p in sample_files() if p.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES | CLASS_SUFFIXES]
    assert not unknown, f"files of no known kind in samples/ (add a check for them): {unknown}"


def test_every_file_is_listed_with_source_and_licence():
    rows = readme_rows()
    files = {p.relative_to(SAMPLES).as_posix() for p in sample_files()}
    missing = sorted(files - rows.keys())
    assert not missing, f"not listed in samples/README.md: {missing}"
    stale = sorted(rows.keys() - files)
    assert not stale, f"listed in samples/README.md but not in samples/: {stale}"
    for name, cells in rows.items():
        assert len(cells) == 4, f"{name}: expected | file | what | source | licence |, got {cells}"
        _, what, source, licence = cells
        assert what and source and licence, f"{name}: empty description, source or licence cell"
        assert "unknown" not in licence.lower(), f"{name}: licence is unknown"


def test_copied_files_match_the_recorded_sha256():
    checked = 0
    for name, cells in readme_rows().items():
        digests = re.findall(r"\b[0-9a-f]{64}\b", cells[2])
        if digests:
            assert hashlib.sha256((SAMPLES / name).read_bytes()).hexdigest() == digests[0], name
            checked += 1
    assert checked >= 4, "the photographs must record the sha256 of the file their package ships"


def test_samples_stay_small():
    sizes = {p.relative_to(SAMPLES).as_posix(): p.stat().st_size for p in sample_files()}
    too_big = {k: v for k, v in sizes.items() if v > MAX_FILE_BYTES}
    assert not too_big, f"over 5 MB: {too_big}"
    assert sum(sizes.values()) < MAX_FILE_BYTES, f"samples/ holds {sum(sizes.values())} bytes in all"


@pytest.mark.parametrize("path", of_kind(IMAGE_SUFFIXES), ids=lambda p: p.relative_to(SAMPLES).as_posix())
def test_image_decodes(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 64
    assert image.std() > 5, f"{path} is (nearly) a flat colour"


@pytest.mark.parametrize("path", of_kind(VIDEO_SUFFIXES), ids=lambda p: p.name)
def test_video_has_frames(path):
    cap = cv2.VideoCapture(str(path))
    try:
        assert cap.isOpened(), f"OpenCV cannot open {path}"
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        assert len(frames) >= 16, f"{path}: only {len(frames)} frames"
        assert {f.shape for f in frames} == {(240, 320, 3)}
        assert cap.get(cv2.CAP_PROP_FPS) > 0
        assert (frames[0] != frames[-1]).any(), "the shapes should move"
    finally:
        cap.release()


@pytest.mark.parametrize("path", of_kind(CLASS_SUFFIXES), ids=lambda p: p.name)
def test_class_file_parses(path):
    from ovdet.text.prompts import load_class_file

    spec = load_class_file(path)  # raises ClassSpecError, with file and line, on any mistake
    assert len(spec.names) >= 3
    assert all(c.conf is None or 0 < c.conf < 1 for c in spec.classes)
