"""`DetectorConfig`: every option of an `OVDetector`, in one frozen object (stdlib only: the CLI imports it for --help).

`OVDetector(model, **overrides)`, `OVDetector.from_config(cfg)`, `annotate_folder(..., config=cfg)`, the engines'
worker specs and the commands' model options (ovdet/cli/_common.py) all read these fields and their defaults from
here, so an option is named, defaulted and documented once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MODEL", "DetectorConfig"]

DEFAULT_MODEL = "yolov8s-worldv2"


@dataclass(frozen=True)
class DetectorConfig:
    """What detector to build and how it runs: weights, text tower, device, backend, precision, thresholds, trust.

    `cfg.replace(device="cpu")` is a copy with some fields changed; an unknown name is a TypeError, as it is for a
    function's keyword arguments.
    """

    model: str | os.PathLike[str] | Any = DEFAULT_MODEL
    """The detector: a name from `ovdet weights list` (e.g. "yolov8s-worldv2", "demo"), a .pt file, an ultralytics
    yaml config, or an already built ultralytics WorldModel."""

    text_model: str | os.PathLike[str] | Any = None
    """The CLIP text tower: a Hugging Face id, a folder, an OpenAI ViT-B-32.pt file or a TextEncoder; None: the one
    embedded in the checkpoint, else CLIP ViT-B/32. Loaded only when a prompt is not in the embedding cache."""

    device: str | Any = "auto"
    """Where the model runs: "auto" (CUDA, then Apple MPS, then CPU), "cpu", "cuda", "cuda:N", "mps" or a
    torch.device."""

    half: bool | None = None
    """fp16 inference with the torch backend; None: on for CUDA, off otherwise."""

    imgsz: int | None = None
    """Inference size in pixels, a multiple of 32; None: the size the checkpoint was trained at (640 for the
    published YOLO-World models, 160 for the demo model)."""

    conf: float = 0.25
    """Minimum confidence a detection needs to be kept (a class's own threshold in its class spec wins)."""

    iou: float = 0.7
    """IoU above which non-maximum suppression drops the weaker of two boxes of a class."""

    max_det: int = 300
    """Most detections kept per image."""

    trust_weights: bool = False
    """Load a .pt file even if it needs more than tensors and YOLO-World layers. This runs code from the file: only
    for files you trust (README, Security)."""

    backend: str = "auto"
    """What runs the forward pass: "auto" (OpenVINO on a CPU, TensorRT on CUDA, when installed; else torch;
    $OVDET_BACKEND overrides auto), "torch", "openvino", "onnxruntime" or "tensorrt"."""

    precision: str | None = None
    """"fp32" (exact), "bf16" (OpenVINO, CPUs with bf16), "fp16" (GPU) or "int8" (OpenVINO, calibrated on `calib`);
    None or "auto": what the backend picks here, bf16 with OpenVINO on CPUs with native bf16, fp16 with torch /
    TensorRT on CUDA, else fp32 (`det.precision` says which)."""

    calib: str | os.PathLike[str] | None = None
    """Folder of images to calibrate int8 on, like the ones you will detect in; None: the samples shipped with ovdet,
    else ultralytics' sample photos."""

    threads: int | None = None
    """CPU threads of the backend; None: torch's thread count."""

    masks: str | os.PathLike[str] | Any = None
    """Instance masks for every box: "grabcut" (OpenCV, no weights), "mobile_sam", "sam2.1_t", "sam2.1_b" or
    "sam_b" (ultralytics' SAM family; weights from `ovdet weights`), a SAM weights file named like one of those, or
    an ovdet.masks.Segmenter; None: boxes only. The masks land in `sv.Detections.mask` (bool, image pixels)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order (the keyword arguments OVDetector takes)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides: Any) -> DetectorConfig:
        """A copy with the given fields changed; TypeError naming any unknown option."""
        unknown = [name for name in overrides if name not in self.names()]
        if unknown:
            raise TypeError(f"unknown detector option {unknown[0]!r}; the options are {', '.join(self.names())}")
        return dataclasses.replace(self, **overrides) if overrides else self
