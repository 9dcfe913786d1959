"""Image readers: files, folders, arrays and PIL images to BGR uint8 frames, with threaded prefetch.

`load_image` is the single entry point every ovdet component uses to turn "an image" into a
contiguous BGR uint8 HxWx3 array. Files are decoded strictly: a truncated or corrupt file is an
error, never a half-grey picture. EXIF orientation is applied to files (as viewers and OpenCV do),
grayscale / alpha / palette / CMYK / 16-bit inputs are converted to 8-bit BGR.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ovdet.errors import DatasetError, ImageReadError, InvalidImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLike",
    "LoadedImage",
    "decode_image",
    "iter_image_files",
    "list_image_files",
    "load_image",
    "prefetch_images",
    "require_image_files",
]

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]

# File name suffixes (lower case) that folder walks pick up; matching is case-insensitive.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

_EXIF_ORIENTATION = 0x0112
_EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "PNG", "WEBP")
_JPEG_EOI = b"\xff\xd9"

# Strict decoding: a truncated file must raise, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(image: ImageLike) -> np.ndarray:
    """Return `image` as a C-contiguous BGR uint8 array of shape HxWx3.

    Accepts a file path (str or PathLike; EXIF orientation applied), a numpy array (BGR HxWx3,
    gray HxW or HxWx1, BGRA HxWx4; uint8 or uint16) or a PIL image (any mode; pixels taken as
    stored, so box coordinates refer to that image's own size). An input that is already a
    contiguous BGR uint8 array is returned as is, without a copy.
    Raises ImageReadError for files that are missing, unreadable, empty, truncated, corrupt or
    not images, and InvalidImageError for in-memory images of the wrong type, shape or dtype.
    """
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, Image.Image):
        try:
            return _from_pil(image)
        except (OSError, ValueError, SyntaxError) as exc:  # lazy PIL images decode here
            raise InvalidImageError(f"the PIL image could not be decoded: {exc}") from exc
    if isinstance(image, (str, os.PathLike)):
        return _from_file(Path(image))
    raise InvalidImageError(
        f"cannot use an object of type {type(image).__name__} as an image; expected a file path "
        "(str or Path), a numpy array (BGR HxWx3, gray HxW or BGRA HxWx4, uint8 or uint16) "
        "or a PIL.Image"
    )


def _from_array(arr: np.ndarray) -> np.ndarray:
    """Convert a BGR / gray / BGRA uint8 or uint16 array to contiguous BGR uint8."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InvalidImageError(
            f"image array has dtype {arr.dtype}; expected uint8 (or uint16), e.g. "
            "convert floats in [0, 1] with (arr * 255).round().astype(np.uint8)"
        )
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok:
        raise InvalidImageError(
            f"image array has shape {arr.shape}; expected HxWx3 (BGR), HxW or HxWx1 (gray) "
            "or HxWx4 (BGRA)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidImageError(f"image array has shape {arr.shape}; height and width must be > 0")
    if arr.ndim == 2 or arr.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(arr.reshape(arr.shape[:2])), cv2.COLOR_GRAY2BGR)
    if arr.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(arr)


def _from_pil(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to contiguous BGR uint8 (alpha dropped, 16-bit scaled)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(img)
        gray = (np.clip(gray, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
        mode = img.mode
    if mode == "RGB":
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
    if mode == "RGBA":
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGBA2BGR)
    if mode == "L":
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_GRAY2BGR)
    if mode == "LA":
        return cv2.cvtColor(np.ascontiguousarray(np.asarray(img)[:, :, 0]), cv2.COLOR_GRAY2BGR)
    # 1, CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La, ...: PIL knows the conversion.
    return cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2BGR)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file does not exist; check the path") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied; make the file readable") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise ImageReadError(f"{path}: file is empty (0 bytes); re-copy or delete it")
    return data


def _from_file(path: Path) -> np.ndarray:
    """Decode an image file strictly; cv2 for plain JPEGs (fast), PIL for everything else."""
    return decode_image(_read_bytes(path), path)


def decode_image(data: bytes, path: str | os.PathLike) -> np.ndarray:
    """Decode the bytes of an image file (read from disk or object storage) to BGR uint8 by load_image's rules.

    `path` names the file in error messages. Raises ImageReadError for empty, truncated, corrupt or unknown data.
    """
    if not data:
        raise ImageReadError(f"{path}: file is empty (0 bytes); re-copy or delete it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _pil_open(io.BytesIO(data))
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if img.format in _EXIF_FORMATS else 1
            fast = (
                img.format == "JPEG"
                and img.mode in ("RGB", "L")
                and orientation == 1
                and data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI)
            )
            if fast:
                flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
                out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
                if out is not None:
                    return out
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            return _from_pil(img)
    except UnidentifiedImageError:
        out = _cv2_fallback(data)
        if out is None:
            raise ImageReadError(
                f"{path}: not a recognised image file (unknown or corrupt format); "
                "expected JPEG, PNG, BMP, WebP or TIFF"
            ) from None
        return out
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: image is too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason:
            reason = f"file is truncated ({reason}); re-copy or delete it"
        else:
            reason = f"corrupt image data ({reason})"
        raise ImageReadError(f"{path}: {reason}") from exc


def _pil_open(fp: io.BytesIO) -> Image.Image:
    """PIL's own Image.open, not ultralytics' patched one (which pip-installs pi-heif on unknown files)."""
    opener = Image.open
    if getattr(opener, "__module__", "") == "ultralytics.utils.patches":
        opener = getattr(sys.modules["ultralytics.utils.patches"], "_image_open", opener)
    return opener(fp)


def _cv2_fallback(data: bytes) -> np.ndarray | None:
    """Decode formats PIL does not know (some TIFF variants) with OpenCV; None if it cannot."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        return None
    if arr.dtype not in (np.uint8, np.uint16):
        return None
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        return None
    return _from_array(arr)


def iter_image_files(folder: str | os.PathLike, recursive: bool = True) -> Iterator[Path]:
    """Yield image files under `folder` in a deterministic, sorted, depth-first order.

    Files are picked by suffix (IMAGE_EXTENSIONS, case-insensitive); hidden entries (names
    starting with ".") are skipped. Symlinked directories are followed once: a directory already
    visited (same device and inode) is not entered again, so symlink loops terminate. Broken
    symlinks with an image suffix are yielded so that the caller can report them.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: input folder does not exist or is not a directory; check the path"
        )
    visited: set[tuple[int, int]] = set()
    yield from _walk(root, recursive, visited)


def _walk(folder: Path, recursive: bool, visited: set[tuple[int, int]]) -> Iterator[Path]:
    try:
        st = folder.stat()
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if key in visited:
        return
    visited.add(key)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            if recursive:
                yield from _walk(Path(entry.path), recursive, visited)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            yield Path(entry.path)


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files under `folder` (see iter_image_files); raises DatasetError if there are none."""
    files = list(iter_image_files(folder, recursive=recursive))
    if not files:
        raise _no_images(folder, recursive)
    return files


def require_image_files(folder: str | os.PathLike, recursive: bool = True) -> None:
    """Raise DatasetError unless `folder` holds at least one image file (stops at the first one found)."""
    if next(iter_image_files(folder, recursive=recursive), None) is None:
        raise _no_images(folder, recursive)


def _no_images(folder: str | os.PathLike, recursive: bool) -> DatasetError:
    where = "or its subfolders " if recursive else ""
    return DatasetError(
        f"{folder}: no image files found in the folder {where}(looked for "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point to a folder that contains images"
        + ("" if recursive else " or drop --no-recursive")
    )


@dataclass
class LoadedImage:
    """One prefetched item: the decoded BGR image, or the error that prevented decoding."""

    index: int
    source: Any
    image: np.ndarray | None
    error: ImageReadError | InvalidImageError | None


def prefetch_images(
    sources: Iterable[ImageLike], workers: int | None = None, ahead: int = 32
) -> Iterator[LoadedImage]:
    """Decode `sources` with load_image in background threads, yielding results in input order.

    At most `ahead` images are decoded but not yet consumed (bounded memory); decoding overlaps
    with whatever the consumer does between items (e.g. batched inference). A file that cannot be
    decoded yields a LoadedImage with `error` set instead of raising, so a long job can skip it.
    """
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    ahead = max(1, ahead)
    it = enumerate(sources)
    pending: deque[tuple[int, Any, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ovdet-decode") as pool:
        try:
            for index, src in it:
                pending.append((index, src, pool.submit(_load_safely, src)))
                if len(pending) >= ahead:
                    yield _result(*pending.popleft())
            while pending:
                yield _result(*pending.popleft())
        finally:
            for _, _, fut in pending:
                fut.cancel()


def _load_safely(src: ImageLike) -> np.ndarray | ImageReadError | InvalidImageError:
    try:
        return load_image(src)
    except (ImageReadError, InvalidImageError) as exc:
        return exc


def _result(index: int, src: Any, fut: Future) -> LoadedImage:
    out = fut.result()
    if isinstance(out, np.ndarray):
        return LoadedImage(index, src, out, None)
    return LoadedImage(index, src, None, out)
