"""The segmenter name table: `create_segmenter("grabcut" | "mobile_sam" | "sam2.1_t" | "sam2.1_b" | "sam_b")`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ovdet.errors import UnknownModelError
from ovdet.masks.base import Segmenter
from ovdet.masks.names import GRABCUT, SAM_MODELS, SEGMENTERS

__all__ = ["create_segmenter"]


def create_segmenter(masks: str | os.PathLike[str] | Segmenter, device: Any = "auto",
                     trust_weights: bool = False) -> Segmenter:
    """The segmenter `masks` names: "grabcut", a SAM model ("mobile_sam", "sam2.1_t", "sam2.1_b", "sam_b", weights
    from `ovdet weights`), a SAM weights file named like one of them, or a Segmenter (returned as is).

    UnknownModelError for anything else, WeightsNotFoundError when a SAM model's weights are missing offline.
    """
    if isinstance(masks, Segmenter):
        return masks
    if not isinstance(masks, (str, os.PathLike)):
        raise UnknownModelError(f"masks={masks!r} is not a segmenter: pass one of {', '.join(SEGMENTERS)} "
                                "or a SAM weights file.")
    text = os.fspath(masks).strip()
    key = text.lower()
    if key == GRABCUT:
        from ovdet.masks.grabcut import GrabCutSegmenter

        return GrabCutSegmenter()
    path = Path(text).expanduser()
    is_file = path.suffix.lower() in (".pt", ".pth")
    stem = path.stem.lower() if is_file else key
    if stem in SAM_MODELS:
        from ovdet.masks.sam import SamSegmenter

        return SamSegmenter.load(stem, path if is_file else None, device=device, trust_weights=trust_weights)
    from ovdet.weights.registry import lookup

    spec = lookup(text)
    kind = f" is a {spec.kind} model, not a segmenter" if spec is not None and spec.kind != "segmenter" else \
        " is not a segmenter ovdet knows"
    raise UnknownModelError(f"'{text}'{kind}. Masks come from one of: {', '.join(SEGMENTERS)} (grabcut needs no "
                            "weights; a SAM weights file must be named like the model, e.g. sam2.1_t.pt).")
