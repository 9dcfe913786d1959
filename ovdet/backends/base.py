"""The base class of every backend (the contract) and the shared machinery of backends that run an exported
live-vocabulary graph."""

from __future__ import annotations

import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ovdet.backends.cache import CompiledCache, library_versions
from ovdet.backends.table import BackendSpec
from ovdet.errors import ModelError
from ovdet.util.device import default_threads, device_type

if TYPE_CHECKING:
    import torch


class Backend(ABC):
    """Runs the detector's forward pass. Every backend subclasses this and is a row of ovdet.backends.table.TABLE
    (`spec`, which gives its name, runtime, devices and precisions).

    Given: `model`, the fused WorldModel (on `device` for torch; a CPU copy that the exported backends export, or
    for them a function that returns it: called only when the compiled model is not in the cache),
    `precision` (one of `spec.precisions`, else a ModelError that says what to use), `device` (a name such as "cpu"
    or "cuda:0", or a torch.device), `threads` (None: the backend's default), and for backends that compile the
    model: `model_id()` (the weights' identity, part of the cache key), `calibration()` (int8 calibration data)
    and the compiled-model `cache`.
    `run(batch, txt_feats)`: letterboxed batch [B,3,H,W] RGB 0..1 and text embeddings [1 or B, K, D] in, raw head
    output [B, 4+K, A] out (xywh boxes in input pixels, then one sigmoid score per embedding row), on the batch's
    device. Exported backends also take numpy arrays in `run_arrays`, the same contract without torch. `name`,
    `precision` and `threads` say what runs (`describe()`, the backend line); `exports` counts the
    graphs this instance exported (a vocabulary change never adds one)."""

    spec: ClassVar[BackendSpec]
    takes_arrays: ClassVar[bool] = True  # run_arrays is its own path (numpy in and out, no torch needed)

    def __init__(self, model: Any, precision: str, device: str | torch.device, threads: int | None = None, *,
                 model_id: Callable[[], str] | None = None, calibration: Callable[[], Calibration] | None = None,
                 cache: CompiledCache | None = None):
        self.check_precision(precision)
        self._model = model
        self.precision = precision
        self.device_name = str(device)
        self.device_type = device_type(self.device_name)
        self.exports = 0

    @property
    def device(self) -> torch.device:
        """The device it runs on, as a torch.device (imports torch)."""
        import torch

        return torch.device(self.device_name)

    @property
    def model(self) -> Any:
        """The fused WorldModel; an exported backend may be given a function that reads it, called only when the
        compiled model has to be built."""
        if not is_torch_module(self._model) and callable(self._model):
            self._model = self._model()
        return self._model

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.spec.precisions

    @property
    @abstractmethod
    def threads(self) -> int:
        """The threads it runs on (intra-op)."""

    @classmethod
    def precision_message(cls, precision: str) -> str:
        """What to say when asked for a precision this backend does not run."""
        return (f"The {cls.spec.name} backend runs {', '.join(cls.spec.precisions)}, not {precision}: pick one of "
                "those, or --backend openvino for bf16 / int8 on a CPU, tensorrt or torch for fp16 on a GPU.")

    @classmethod
    def auto_precision(cls, device_type: str, half: bool | None = None) -> tuple[str, str]:
        """The precision it runs when none is asked for on a device of `device_type` ("cpu", "cuda", "mps"), and why
        in a few words (the backend line shows them): fp16 where the row lists it and the device is CUDA (unless
        `half` is False), else fp32."""
        if "fp16" in cls.spec.precisions and device_type == "cuda" and half is not False:
            return "fp16", "fp16 on CUDA"
        return "fp32", ""

    @classmethod
    def check_precision(cls, precision: str) -> None:
        """A ModelError that says what to use when `precision` is not one this backend runs."""
        if precision not in cls.spec.precisions:
            raise ModelError(cls.precision_message(precision))

    @abstractmethod
    def run(self, batch: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
        """The raw head output [B, 4+K, A] for `batch` and `txt_feats` (see the class docstring)."""

    def describe(self) -> str:
        """What runs, in words, e.g. "openvino fp32, 2 threads" (the start of the backend line)."""
        return f"{self.name} {self.precision}, {self.threads} thread{'s' if self.threads != 1 else ''}"


@dataclass
class Calibration:
    """Calibration data for int8: `inputs(txt_feats)` gives (images, txt_feats) numpy pairs; `digest` names them."""

    digest: str
    source: str
    inputs: Callable[[np.ndarray], Sequence[tuple[np.ndarray, np.ndarray]]]


@dataclass
class BuildInfo:
    """How the compiled model of a backend came to be in this process: `cached` (loaded from $OVDET_HOME/compiled)
    or built (exported, converted, quantized), and the seconds it took including compilation for the device."""

    cached: bool
    seconds: float
    path: Path


class ExportedBackend(Backend):
    """A backend whose model is the live-vocabulary graph exported once (ONNX, then the runtime's format),
    kept in the compiled-model cache, and loaded lazily on the first run. `threads` None means torch's thread count
    (ovdet.util.device.default_threads: known without loading torch). Subclasses set `spec` and implement
    `_build(folder)`, `_load(folder)` and `_infer(images, txt)`."""

    def __init__(self, model: Any, precision: str, device: str | torch.device, threads: int | None = None, *,
                 model_id: Callable[[], str] | None = None, calibration: Callable[[], Calibration] | None = None,
                 cache: CompiledCache | None = None):
        super().__init__(model, precision, device, threads)
        if model_id is None:
            raise TypeError(f"{type(self).__name__} needs model_id: the weights' identity names its cache entry")
        self._model_id = model_id
        self._threads = int(threads) if threads else default_threads()
        self._calibration = calibration
        self.cache = cache or CompiledCache()
        self.build_info: BuildInfo | None = None
        self._runner: Any = None
        self._lock = threading.Lock()

    @property
    def threads(self) -> int:
        return self._threads

    def kind(self, calibration: Calibration | None) -> str:
        """What the cached file holds: precisions that only differ in how the runtime compiles share a file."""
        return self.precision

    def prepare(self, txt_feats: np.ndarray | None = None) -> BuildInfo:
        """Load the compiled model from the cache, exporting and converting it first if it is not there."""
        with self._lock:
            return self._prepare(txt_feats)

    def _prepare(self, txt_feats: np.ndarray | None) -> BuildInfo:
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
                  "versions": library_versions(self.spec.runtime, *self.extra_packages(kind))}

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
        import torch

        out = self.run_arrays(batch.detach().float().cpu().numpy(), txt_feats.detach().float().cpu().numpy())
        return torch.from_numpy(out).to(batch.device)

    def run_arrays(self, images: np.ndarray, txt: np.ndarray) -> np.ndarray:
        """`run` on numpy arrays (float32 [B,3,H,W] and [1 or B, K, D]), without torch: the raw head output."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        txt = np.ascontiguousarray(txt, dtype=np.float32)
        with self._lock:
            if self.build_info is None:
                self._prepare(txt)
            return self._infer(images, txt)

    def _build(self, folder: Path, kind: str, calibration: Calibration | None, txt_feats: np.ndarray | None) -> None:
        raise NotImplementedError

    def _load(self, folder: Path) -> Any:
        raise NotImplementedError

    def _infer(self, images: np.ndarray, txt: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.precision}, threads={self.threads})"


def is_torch_module(obj: Any) -> bool:
    """Whether `obj` is a torch.nn.Module, asked without importing torch (if torch is not loaded, it is not one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
