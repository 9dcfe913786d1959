"""The region–text model: YOLO-World weights, text embeddings set on the model, letterbox, forward, NMS."""

from __future__ import annotations

import hashlib
import logging
import platform
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.nn.tasks import WorldModel
from ultralytics.utils import LOGGER as ULTRALYTICS_LOGGER
from ultralytics.utils import nms, ops

from ovdet.errors import ModelError, WeightsCorruptError

TEXT_ENCODER_KEY = "ovdet_text_encoder"  # checkpoint key under which ovdet-trained models carry their text tower


def select_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"Device {device!r} asked for, but CUDA is not available here: use device='cpu' or 'auto'.")
    return dev


def _channels_last_helps(device: torch.device) -> bool:
    """On x86 CPUs with oneDNN, channels-last convolutions are faster (ultralytics predict makes the same choice)."""
    return (device.type == "cpu" and platform.machine() in {"AMD64", "x86_64"}
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _state_digest(model: torch.nn.Module) -> str:
    """A short sha256 over the model's tensors, for models that come from no file."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_world_checkpoint(path: Path) -> tuple[WorldModel, dict[str, Any]]:
    """Read an ultralytics YOLO-World checkpoint; a truncated or foreign file raises WeightsCorruptError."""
    if not zipfile.is_zipfile(path):
        raise WeightsCorruptError(
            f"{path} is not a readable PyTorch checkpoint (truncated download or wrong file). "
            "Delete it and download it again, or import a good copy with `ovdet weights import PATH`."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch/pickle raise many types for damaged archives
        raise WeightsCorruptError(
            f"{path} could not be loaded ({type(exc).__name__}: {exc}). The file is damaged or was saved by an "
            "incompatible program: download it again or import a good copy with `ovdet weights import PATH`."
        ) from exc
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, WorldModel):
        kind = type(model).__name__ if model is not None else type(ckpt).__name__
        raise WeightsCorruptError(
            f"{path} holds a {kind}, not a YOLO-World model. ovdet needs a YOLO-World checkpoint such as "
            "yolov8s-worldv2.pt, or one written by `ovdet train`."
        )
    return model.float(), ckpt


class WorldDetector:
    """A YOLO-World model on a device with its class embeddings set: images in, boxes out (N×6 per image)."""

    def __init__(self, model: WorldModel, name: str, device: str | torch.device = "auto", half: bool | None = None,
                 digest: str | None = None, text_encoder_state: dict | None = None):
        self.device = select_device(device)
        self.half = (self.device.type == "cuda") if half is None else bool(half)
        if self.half and self.device.type == "cpu":
            raise ModelError("half=True needs a GPU: fp16 convolutions are not supported on CPU; use half=False.")
        model = model.fuse(verbose=False).eval().to(self.device)
        model = model.half() if self.half else model.float()
        if _channels_last_helps(self.device):
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.name = name
        self.stride = max(int(model.stride.max()), 32)
        self.embed_dim = int(model.txt_feats.shape[-1])
        self.text_encoder_state = text_encoder_state
        self._digest = digest
        self._txt_feats: torch.Tensor | None = None

    @classmethod
    def load(cls, source: str | Path | WorldModel, device: str | torch.device = "auto",
             half: bool | None = None) -> WorldDetector:
        """Load from a checkpoint path, a registry name, an ultralytics yaml config (random weights) or a model."""
        if isinstance(source, WorldModel):
            return cls(source, type(source).__name__, device, half)
        text = str(source)
        if text.endswith((".yaml", ".yml")):
            with _quiet_ultralytics():
                try:
                    model = WorldModel(text, verbose=False)
                except FileNotFoundError as exc:
                    raise ModelError(f"Model config {text!r} not found: give a path or an ultralytics config "
                                     "name such as 'yolov8s-worldv2.yaml'.") from exc
            return cls(model, Path(text).name, device, half)
        from ovdet.weights import resolve_detector

        path = resolve_detector(text)
        model, ckpt = load_world_checkpoint(path)
        return cls(model, path.stem, device, half, digest=_file_digest(path),
                   text_encoder_state=ckpt.get(TEXT_ENCODER_KEY))

    @property
    def model_id(self) -> str:
        """`name@sha` of the weights: stable across runs, different for different weights."""
        if self._digest is None:
            self._digest = _state_digest(self.model)
        return f"{self.name}@{self._digest}"

    @property
    def num_classes(self) -> int:
        return 0 if self._txt_feats is None else int(self._txt_feats.shape[1])

    def set_text_embeddings(self, embeddings: torch.Tensor) -> None:
        """Use these [C, D] L2-normalized class embeddings for every following forward."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ModelError(f"Class embeddings must have shape [C, {self.embed_dim}], got {tuple(embeddings.shape)}: "
                             "the text tower does not match this detector.")
        dtype = torch.float16 if self.half else torch.float32
        self._txt_feats = embeddings.detach().to(self.device, dtype)[None]
        self.model.txt_feats = self._txt_feats
        self.model.model[-1].nc = embeddings.shape[0]

    def preprocess(self, images: list[np.ndarray], imgsz: int) -> torch.Tensor:
        """Letterbox BGR uint8 images exactly as ultralytics predict does; returns a normalized RGB batch."""
        same_shapes = len({im.shape for im in images}) == 1
        letterbox = LetterBox((imgsz, imgsz), auto=same_shapes, stride=self.stride)
        boxed = [letterbox(image=im) for im in images]
        batch = torch.from_numpy(boxed[0]).unsqueeze(0) if len(boxed) == 1 else torch.from_numpy(np.stack(boxed))
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).flip(1)
        return (batch.half() if self.half else batch.float()).div_(255)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], imgsz: int = 640, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300) -> list[torch.Tensor]:
        """Detect in BGR uint8 images; per image an N×6 CPU tensor (x1, y1, x2, y2, score, class) in its pixels."""
        if self._txt_feats is None:
            raise ModelError("No classes set: call set_classes([...]) before detecting.")
        batch = self.preprocess(images, imgsz)
        preds = self.model.predict(batch, txt_feats=self._txt_feats)
        kept = nms.non_max_suppression(preds, conf, iou, max_det=max_det)
        out = []
        for det, im in zip(kept, images):
            det[:, :4] = ops.scale_boxes(batch.shape[2:], det[:, :4], im.shape)
            out.append(det.float().cpu())
        return out


class _quiet_ultralytics:
    """Silence ultralytics' model-summary logging while building from yaml."""

    def __enter__(self):
        self.level = ULTRALYTICS_LOGGER.level
        ULTRALYTICS_LOGGER.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        ULTRALYTICS_LOGGER.setLevel(self.level)
