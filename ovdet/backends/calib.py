"""Calibration images for int8: a folder (--calib DIR), or the samples shipped with ovdet / ultralytics."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ovdet.backends.base import Calibration
from ovdet.errors import DatasetError, ModelError

MAX_IMAGES = 300  # NNCF's default subset size: more images do not change the ranges much


def default_calibration_folder() -> Path:
    """The repository's samples/ folder (photos and shapes) when ovdet runs from a checkout, else the photos that
    ultralytics ships (assets/: bus.jpg, zidane.jpg)."""
    repo_samples = Path(__file__).resolve().parents[2] / "samples"
    if repo_samples.is_dir():
        return repo_samples
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets"


def calibration_files(calib: str | os.PathLike | None) -> tuple[list[Path], Path]:
    """Up to MAX_IMAGES image files of `calib` (default: default_calibration_folder()), evenly spread, sorted."""
    from ovdet.media.sources import list_image_files

    folder = Path(calib) if calib is not None else default_calibration_folder()
    if not folder.is_dir():
        raise ModelError(f"Calibration folder {folder} does not exist: give --calib a folder of images.")
    try:
        files = list_image_files(folder)
    except DatasetError as exc:
        raise ModelError(f"No images in calibration folder {folder}: give --calib a folder of images like the ones "
                         "you will detect in.") from exc
    if not files:
        raise ModelError(f"No images in calibration folder {folder}: give --calib a folder of images.")
    if len(files) > MAX_IMAGES:
        step = len(files) / MAX_IMAGES
        files = [files[int(i * step)] for i in range(MAX_IMAGES)]
    return files, folder


def make_calibration(calib: str | os.PathLike | None, imgsz: int,
                     preprocess: Callable[[list[np.ndarray], int], np.ndarray]) -> Calibration:
    """A Calibration over the files of `calib`, letterboxed at `imgsz` by `preprocess` (as detection does).
    Its digest covers the files' bytes and imgsz, so other images give another cached int8 model."""
    from ovdet.media.sources import load_image

    files, folder = calibration_files(calib)
    digest = hashlib.sha256(str(imgsz).encode())
    for f in files:
        digest.update(hashlib.sha256(f.read_bytes()).digest())

    def inputs(txt_feats: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        txt = np.ascontiguousarray(txt_feats, dtype=np.float32)
        out = []
        for f in files:
            batch = preprocess([load_image(f)], imgsz)
            out.append((np.ascontiguousarray(batch, dtype=np.float32), txt))
        return out

    return Calibration(digest=digest.hexdigest()[:16], source=str(folder), inputs=inputs)
