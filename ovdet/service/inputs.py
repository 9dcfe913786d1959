"""What a request brings, checked before it costs anything: image bytes (size from the header first), classes in
ovdet's inline syntax or a class document (no file paths, no exemplars), and images named by URL or local path."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import sys
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovdet.errors import ClassSpecError, ImageError
from ovdet.media.sources import decode_image
from ovdet.service.settings import ServeSettings, ServiceError
from ovdet.text.limits import LIMITS, limit
from ovdet.text.prompts import ClassSpec, parse_classes

__all__ = ["decode_base64", "decode_upload", "fetch_image", "parse_request_classes"]


def decode_upload(data: bytes, name: str, settings: ServeSettings) -> np.ndarray:
    """BGR pixels of an uploaded image, refusing one whose header claims more than settings.max_pixels before any
    pixel is decoded; 400 for garbage or truncated data, 413 for too many pixels."""
    if not data:
        raise ServiceError(400, "empty_image", f"{name}: the image is empty (0 bytes); send the file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _pil_open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        width = height = None  # PIL's own cap (far above ours) refused it: too many pixels
    except Exception:  # not an image PIL knows from its header: decode_image decides (OpenCV fallback) and explains
        width = height = 0
    if width is None or width * height > settings.max_pixels:
        size = "more than PIL's bomb limit" if width is None else f"{width}×{height} = {width * height:,}"
        raise ServiceError(413, "too_many_pixels",
                           f"{name}: the image is {size} pixels, more than this server's cap of "
                           f"{settings.max_pixels:,}; resize it, or start the server with a larger --max-pixels")
    try:
        image = decode_image(data, name)
    except ImageError as exc:
        raise ServiceError(400, "bad_image", str(exc)) from None
    if image.shape[0] * image.shape[1] > settings.max_pixels:
        raise ServiceError(413, "too_many_pixels", f"{name}: {image.shape[1]}×{image.shape[0]} pixels is more than "
                           f"this server's cap of {settings.max_pixels:,}; resize it")
    return image


def _pil_open(fp: io.BytesIO) -> Image.Image:
    """PIL's own Image.open, not ultralytics' patch of it (which tries to pip-install pi-heif on unknown data)."""
    opener = Image.open
    if getattr(opener, "__module__", "") == "ultralytics.utils.patches":
        opener = getattr(sys.modules["ultralytics.utils.patches"], "_image_open", opener)
    return opener(fp)


def decode_base64(text: Any, name: str, settings: ServeSettings) -> np.ndarray:
    """An image sent as base64 text (a data: URL prefix is allowed)."""
    if not isinstance(text, str):
        raise ServiceError(400, "bad_image", f"{name}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "bad_base64", f"{name}: not valid base64; encode the file's bytes with base64 "
                           "(standard alphabet, padded)") from None
    return decode_upload(data, name, settings)


def _class_document(value: Any) -> Any:
    """`value` as parse_classes reads it, never naming a file on this server: a string is inline syntax, split on
    commas; a list or a class document (mapping) is taken as data, exemplars refused (they name image files)."""
    if isinstance(value, str):
        return value.split(",")
    if isinstance(value, (list, dict)):
        if "exemplars" in json.dumps(value) and _has_key(value, "exemplars"):
            raise ServiceError(400, "exemplars_unsupported",
                               "exemplars are not accepted over HTTP (they name image files on the server); "
                               "describe the classes in words")
        if isinstance(value, dict) and isinstance(value.get("negatives"), list) \
                and any(isinstance(n, dict) for n in value["negatives"]):
            raise ServiceError(400, "exemplars_unsupported",
                               "negative exemplars are not accepted over HTTP; give negatives as words")
        return value
    raise ServiceError(400, "bad_classes", f"classes must be a string such as 'person,bus', a list or a class "
                       f"document, got {type(value).__name__}")


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, key) for v in value)
    return False


def parse_request_classes(value: Any, settings: ServeSettings) -> ClassSpec:
    """The ClassSpec of a request's `classes` (inline syntax, list or class document), within the class caps."""
    cap = settings.max_classes or limit("classes")
    if isinstance(value, str) and value.count(",") >= cap:
        raise ServiceError(400, "too_many_classes", f"the request names {value.count(',') + 1} classes, more than "
                           f"this server's cap of {cap} ({LIMITS['classes'][0]}); send fewer")
    try:
        spec = parse_classes(_class_document(value))
    except ClassSpecError as exc:
        raise ServiceError(400, "bad_classes", str(exc)) from None
    if len(spec.classes) > cap:
        raise ServiceError(400, "too_many_classes", f"the request names {len(spec.classes)} classes, more than this "
                           f"server's cap of {cap}; send fewer")
    return spec


def fetch_image(ref: str, settings: ServeSettings) -> np.ndarray:
    """The image a task names: an http(s) URL (only with allow_urls) or a path under data_root (Label Studio's
    /data/upload/..., /data/local-files/?d=... and plain paths); anything else is refused with a 4xx."""
    if not isinstance(ref, str) or not ref:
        raise ServiceError(400, "bad_image_ref", "an image must be named by a URL or path string")
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    if scheme in ("http", "https"):
        if not settings.allow_urls:
            raise ServiceError(400, "urls_disabled", f"{ref[:200]}: this server does not fetch URLs; start it with "
                               "--allow-urls, or upload the image")
        return decode_upload(_download(ref, settings), ref[:200], settings)
    if scheme not in ("", "file"):
        raise ServiceError(400, "bad_image_ref", f"{ref[:200]}: only http(s) URLs and paths are understood")
    return decode_upload(_read_local(ref, settings), ref[:200], settings)


def _download(url: str, settings: ServeSettings) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=settings.url_timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(settings.max_body_bytes + 1)
    except OSError as exc:
        raise ServiceError(400, "fetch_failed", f"{url[:200]}: cannot be fetched ({exc}); check the URL") from None
    if len(data) > settings.max_body_bytes:
        raise ServiceError(413, "image_too_large", f"{url[:200]}: more than {settings.max_body_bytes:,} bytes")
    return data


def _read_local(ref: str, settings: ServeSettings) -> bytes:
    parts = urllib.parse.urlsplit(ref)
    query = urllib.parse.parse_qs(parts.query)
    if parts.path.rstrip("/").endswith("/data/local-files") and "d" in query:  # Label Studio's local files storage: d is relative to its LOCAL_FILES_DOCUMENT_ROOT
        rel, folder, option = query["d"][0], settings.local_files_root, "--local-files-root"
        if folder is None:  # without its own root, local files are read under --data-root
            folder, option = settings.data_root, "--data-root"
    else:  # an upload (/data/upload/...: relative to Label Studio's media folder) or a plain path
        rel, folder, option = urllib.parse.unquote(parts.path), settings.data_root, "--data-root"
        rel = rel[len("/data/"):] if rel.startswith("/data/") else rel
    if folder is None:
        raise ServiceError(400, "paths_disabled", f"{ref[:200]}: this server reads no local files; start it with "
                           "--data-root FOLDER (Label Studio's media folder, for uploads) and/or --local-files-root "
                           "FOLDER (its LOCAL_FILES_DOCUMENT_ROOT, for local files storage)")
    root = Path(os.path.realpath(folder))
    path = Path(os.path.realpath(rel if os.path.isabs(rel) else root / rel))  # links followed, then checked
    if not path.is_relative_to(root) or path == root:
        raise ServiceError(403, "outside_data_root", f"{ref[:200]}: outside the server's {option}")
    try:
        if path.stat().st_size > settings.max_body_bytes:
            raise ServiceError(413, "image_too_large", f"{ref[:200]}: more than {settings.max_body_bytes:,} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise ServiceError(404, "image_not_found", f"{ref[:200]}: no such file under {option}") from None
    except OSError as exc:
        raise ServiceError(400, "image_unreadable", f"{ref[:200]}: cannot be read ({exc.strerror})") from None
