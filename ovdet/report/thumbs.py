"""Report thumbnails: one small JPEG per image in RUN_DIR/thumbs/, written once and reused by later reports."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from ovdet.progress import progress
from ovdet.sinks import atomic_write, remove_stale_temp_files
from ovdet.sources import prefetch_images

__all__ = ["THUMB_SIZE", "make_thumbnails"]

THUMB_SIZE = 320  # longest side, pixels: sharp in a gallery card, ~15 KB each


def make_thumbnails(folder: str | Path, items: Iterable[tuple[str, str]], size: int = THUMB_SIZE,
                    quiet: bool = False) -> dict[str, str]:
    """Thumbnails of (key, image path) items as folder/KEY.jpg; returns {key: reason} of images that failed.

    Existing thumbnails are kept (they are the same picture); images are decoded in background threads with
    EXIF orientation applied, as annotate read them, so box coordinates match.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder)
    todo = [(key, path) for key, path in items if not (folder / f"{key}.jpg").exists()]
    failed: dict[str, str] = {}
    loaded = prefetch_images([path for _, path in todo])
    with progress(total=len(todo), desc="thumbnails", unit="img", quiet=quiet or not todo) as bar:
        for (key, _), item in zip(todo, loaded):
            bar.update(1)
            if item.error is not None:
                failed[key] = str(item.error)
            else:
                _write_thumbnail(folder / f"{key}.jpg", item.image, size)
    return failed


def _write_thumbnail(path: Path, image: np.ndarray, size: int) -> None:
    h, w = image.shape[:2]
    scale = min(1.0, size / max(h, w))
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise OSError(f"could not encode the thumbnail {path}")
    atomic_write(path, buf.tobytes())
