"""Exemplar thumbnails for the report: the crop each exemplar class was shown by, as a small inline JPEG.

run.json records each exemplar's image path, sha256 and box (ovdet.text.exemplars). A crop is shown only when the
file at that path is a regular image file (the size cap and checks of ovdet.Exemplar) whose sha256 is still the
one recorded: a run folder from elsewhere cannot make the report read and show any other file on this machine.
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np

from ovdet.errors import OVDetError

__all__ = ["EXEMPLAR_THUMB", "exemplar_thumbnails"]

EXEMPLAR_THUMB = 64  # longest side of an exemplar thumbnail, pixels
MAX_SHOWN = 8  # thumbnails per class (a class may have many exemplars)


def exemplar_thumbnails(records: Any) -> dict[str, list[str]]:
    """{class name: [data URI, ...]} for run.json's "exemplars" (the positive ones); records whose file is gone,
    changed or not an image are left out."""
    out: dict[str, list[str]] = {}
    if not isinstance(records, list) or not records:
        return out
    from ovdet.text.exemplars import Exemplar  # only for runs that have exemplars (it imports torch)

    for record in records:
        name = record.get("class") if isinstance(record, dict) else None
        if not isinstance(name, str) or record.get("negative") is not False or not isinstance(record.get("image"), str):
            continue
        shown = out.setdefault(name, [])
        if len(shown) >= MAX_SHOWN:
            continue
        try:
            exemplar = Exemplar(record["image"], box=record.get("box"), name=name)
            if exemplar.sha256 != record.get("sha256"):
                continue
            shown.append(_data_uri(exemplar.crop()))
        except (OVDetError, OSError, ValueError):  # moved, changed, unreadable or not an image: no thumbnail
            continue
    return out


def _data_uri(crop: np.ndarray) -> str:
    h, w = crop.shape[:2]
    scale = EXEMPLAR_THUMB / max(h, w)
    if scale < 1:
        crop = cv2.resize(crop, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("the crop could not be encoded")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii")
