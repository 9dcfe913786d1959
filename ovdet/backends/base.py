"""The backend protocol and the shared machinery of backends that run an exported live-vocabulary graph."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ovdet.backends.cache import CompiledCache, library_versions
from ovdet.errors import ModelError


@runtime_checkable
class Backend(Protocol):
    """Runs the detector's forward pass: letterboxed batch [B,3,H,W] RGB 0..1 and text embeddings [1 or B, K, D] in,
    raw head output [B, 4+K, A] out (xywh boxes in input pixels, then one sigmoid score per embedding row)."""

    name: str
    precision: str
    threads: int

    def run(self, batch: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Calibration:
    """Calibration data for int8: `inputs(txt_feats)` gives (images, txt_feats) numpy pairs; `digest` names them."""

    digest: str
    source: str
    inputs: Callable[[torch.Tensor], Sequence[tuple[np.ndarray, np.ndarray]]]


@dataclass
class BuildInfo:
    """How the compiled model of a backend came to be in this process: `cached` (loaded from $OVDET_HOME/compiled)
    or built (exported, converted, quantized), and the seconds it took including compilation for the device."""

    cached: bool
    seconds: float
    path: Path


class ExportedBackend:
    """A backend whose model is the live-vocabulary graph exported once (ONNX, then the runtime's format),
    kept in the compiled-model cache, and loaded lazily on the first run. Subclasses set `name`, `runtime`,
    `precisions` and implement `_build(folder)`, `_load(folder)` and `_infer(images, txt)`."""

    name = ""
    runtime = ""  # the runtime's package name, part of the cache key
    precisions: tuple[str, ...] = ("fp32",)

    def __init__(self, model: Any, model_id: Callable[[], str], precision: str, threads: int,
                 device: torch.device, calibration: Callable[[], Calibration] | None = None,
                 cache: CompiledCache | None = None):
        if precision not in self.precisions:
            raise ModelError(self._precision_message(precision))
        self.model = model
        self._model_id = model_id
        self.precision = precision
        self.threads = int(threads)
        self.device = device
        self._calibration = calibration
        self.cache = cache or CompiledCache()
        self.exports = 0  # graphs this instance exported (a vocabulary change never adds one)
        self.build_info: BuildInfo | None = None
        self._runner: Any = None
        self._lock = threading.Lock()

    def _precision_message(self, precision: str) -> str:
        return (f"The {self.name} backend runs {', '.join(self.precisions)}, not {precision}: pick one of those, or "
                "--backend openvino for bf16 / int8 on a CPU, tensorrt or torch for fp16 on a GPU.")

    def kind(self, calibration: Calibration | None) -> str:
        """What the cached file holds: precisions that only differ in how the runtime compiles share a file."""
        return self.precision

    def prepare(self, txt_feats: torch.Tensor | None = None) -> BuildInfo:
        """Load the compiled model from the cache, exporting and converting it first if it is not there."""
        with self._lock:
            return self._prepare(txt_feats)

    def _prepare(self, txt_feats: torch.Tensor | None) -> BuildInfo:
        if self.build_info is not None:
            return self.build_info
        start = time.perf_counter()
        calibration = None
        if self.precision == "int8":
            if self._calibration is None:
                raise ModelError("int8 needs calibration images: pass calib=DIR (--calib DIR).")
            calibration = self._calibration()
        kind = self.kind(calibration)
        fields = {"model": self._model_id(), "backend": self.name, "kind": kind,
                  "versions": library_versions(self.runtime, *self.extra_packages(kind))}

        def build(folder: Path) -> None:
            self.exports += 1
            self._build(folder, kind, calibration, txt_feats)

        self._runner, built = self.cache.get_or_build(fields, build, self._load)
        self.build_info = BuildInfo(cached=not built, seconds=time.perf_counter() - start,
                                    path=self.cache.path_for(fields))
        return self.build_info

    def extra_packages(self, kind: str) -> tuple[str, ...]:
        """More packages whose version changes the cached file (e.g. nncf for int8)."""
        return ()

    def run(self, batch: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        txt = np.ascontiguousarray(txt_feats.detach().float().cpu().numpy())
        with self._lock:
            if self.build_info is None:
                self._prepare(txt_feats)
            out = self._infer(images, txt)
        return torch.from_numpy(out).to(batch.device)

    def _build(self, folder: Path, kind: str, calibration: Calibration | None, txt_feats: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _load(self, folder: Path) -> Any:
        raise NotImplementedError

    def _infer(self, images: np.ndarray, txt: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.precision}, threads={self.threads})"
