"""`OVDetector`: the public facade. Name classes in words, get `supervision.Detections`. Holds no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv
import torch

from ovdet.errors import ClassSpecError, ModelError
from ovdet.sources import load_image
from ovdet.text import TextEncoder
from ovdet.world import WorldDetector


def parse_class_names(classes: str | Sequence[str]) -> list[str]:
    """Validate a class list (or a comma-separated string): non-empty, no blanks, no duplicates."""
    if isinstance(classes, str):
        classes = classes.split(",")
    if not isinstance(classes, Sequence) or not all(isinstance(c, str) for c in classes):
        raise ClassSpecError(f"Classes must be a list of strings such as ['person', 'bus'], got {classes!r}.")
    names = [c.strip() for c in classes]
    if not names:
        raise ClassSpecError("The class list is empty: name at least one thing to find, e.g. ['person'].")
    blank = [i for i, n in enumerate(names) if not n]
    if blank:
        raise ClassSpecError(f"Class name at position {blank[0]} is blank: remove it or give it a name.")
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.lower().split())
        if key in seen:
            raise ClassSpecError(f"Class {name!r} is listed twice (as {seen[key]!r} too): each class once, please.")
        seen[key] = name
    return names


class OVDetector:
    """Open-vocabulary detector: `set_classes([...])`, then `detect(image)` → `sv.Detections`."""

    def __init__(self, model: str | Path | Any = "yolov8s-worldv2", text_model: str | Path | TextEncoder | None = None,
                 device: str | torch.device = "auto", half: bool | None = None, imgsz: int = 640,
                 conf: float = 0.25, iou: float = 0.7, max_det: int = 300):
        self.world = WorldDetector.load(model, device=device, half=half)
        self.imgsz, self.conf, self.iou, self.max_det = imgsz, conf, iou, max_det
        self._text_source = text_model
        self._text_encoder = text_model.to(self.device) if isinstance(text_model, TextEncoder) else None
        self._classes: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def model_id(self) -> str:
        """Identity of the detector weights (name@sha), e.g. to refuse resuming a job with another model."""
        return self.world.model_id

    @property
    def text_encoder(self) -> TextEncoder:
        """The text tower, loaded on first use: the one embedded in the checkpoint, or CLIP ViT-B/32."""
        if self._text_encoder is None:
            if self._text_source is None and self.world.text_encoder_state is not None:
                encoder = TextEncoder.from_state(self.world.text_encoder_state)
            else:
                from ovdet.weights import resolve_text_model

                encoder = TextEncoder.load(resolve_text_model(self._text_source), device=self.device)
            self._text_encoder = encoder.to(self.device)
        return self._text_encoder

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def set_classes(self, classes: str | Sequence[str]) -> None:
        """Encode these class names with the text tower; takes effect on the next detect call."""
        names = parse_class_names(classes)
        self.set_embeddings(names, self.text_encoder.encode(names))

    def set_embeddings(self, names: Sequence[str], embeddings: torch.Tensor) -> None:
        """Use precomputed [C, D] text embeddings for these class names (skips the text tower)."""
        names = parse_class_names(list(names))
        if len(names) != len(embeddings):
            raise ClassSpecError(f"{len(names)} class names but {len(embeddings)} embeddings: give one per class.")
        self.world.set_text_embeddings(embeddings)
        self._classes = names

    def detect(self, image: Any, conf: float | None = None, iou: float | None = None, max_det: int | None = None,
               imgsz: int | None = None) -> sv.Detections:
        """Detect the current classes in one image (path, BGR ndarray or PIL image)."""
        return self.detect_batch([image], conf=conf, iou=iou, max_det=max_det, imgsz=imgsz)[0]

    def detect_batch(self, images: Iterable[Any], conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, imgsz: int | None = None) -> list[sv.Detections]:
        """Detect in several images with one forward pass; one `sv.Detections` per image, in order."""
        if not self._classes:
            raise ModelError("No classes set: call set_classes(['person', ...]) before detecting.")
        arrays = [load_image(im) for im in images]
        if not arrays:
            return []
        raw = self.world(arrays, imgsz=imgsz or self.imgsz, conf=self.conf if conf is None else conf,
                         iou=self.iou if iou is None else iou, max_det=max_det or self.max_det)
        return [self._to_detections(r) for r in raw]

    def stream(self, source: Any, track: bool = False, **kwargs: Any) -> Iterator[tuple[np.ndarray, sv.Detections]]:
        """Yield (frame, detections) for a video file, camera index, URL or iterable of frames."""
        from ovdet.stream import stream

        return stream(self, source, track=track, **kwargs)

    def _to_detections(self, det: torch.Tensor) -> sv.Detections:
        arr = det.numpy()
        class_id = arr[:, 5].astype(int)
        return sv.Detections(
            xyxy=arr[:, :4].astype(np.float32),
            confidence=arr[:, 4].astype(np.float32),
            class_id=class_id,
            data={"class_name": np.array(self._classes, dtype=object)[class_id].astype(str)
                  if len(class_id) else np.array([], dtype=str)},
        )
