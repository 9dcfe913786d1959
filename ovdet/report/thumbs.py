"""Report thumbnails: one small JPEG per image in RUN_DIR/thumbs/, written once and reused by later reports."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np

from ovdet.util.progress import progress
from ovdet.util.safeio import Folder
from ovdet.media.sources import prefetch_images

__all__ = ["THUMB_SIZE", "make_thumbnails"]

THUMB_SIZE = 320  # longest side, pixels: sharp in a gallery card, ~15 KB each


def make_thumbnails(folder: str | Path, items: Iterable[tuple[str, str]], size: int = THUMB_SIZE,
                    quiet: bool = False, check: Callable[[str], str] | None = None,
                    root: str | Path | None = None) -> dict[str, str]:
    """Thumbnails of (key, image path) items as folder/KEY.jpg; returns {key: reason} of images that failed.

    Existing thumbnails (plain files, not links) are kept: they are the same picture. `check(path)` gives the
    reason an image must not be read ("" if it may); such images fail with that reason. `folder` is created and
    opened without following a link anywhere below `root` (default: its parent). Images are decoded in background
    threads with EXIF orientation applied, as annotate read them, so box coordinates match.
    """
    failed: dict[str, str] = {}
    with Folder(folder, root, create=True) as out:
        out.remove_stale_temp_files()
        todo = []
        for key, path in items:
            if _is_plain_file(out, f"{key}.jpg"):
                continue
            problem = check(path) if check is not None else ""
            if problem:
                failed[key] = problem
            else:
                todo.append((key, path))
        loaded = prefetch_images([path for _, path in todo])
        with progress(total=len(todo), desc="thumbnails", unit="img", quiet=quiet or not todo) as bar:
            for (key, _), item in zip(todo, loaded):
                bar.update(1)
                if item.error is not None:
                    failed[key] = str(item.error)
                else:
                    out.write(f"{key}.jpg", _encode(item.image, size, out.path / f"{key}.jpg"))
    return failed


def _is_plain_file(folder: Folder, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=folder.fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _encode(image: np.ndarray, size: int, path: Path) -> bytes:
    h, w = image.shape[:2]
    scale = min(1.0, size / max(h, w))
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise OSError(f"could not encode the thumbnail {path}")
    return buf.tobytes()
