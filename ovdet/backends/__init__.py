"""Backends: the forward pass behind one base class (letterboxed batch + text embeddings → raw head output [B,4+K,A]).

Which backends exist, where they run and at which precisions is ovdet.backends.table.TABLE; `resolve` and
`create_backend` read it, and every backend class subclasses ovdet.backends.base.Backend. `torch` runs ultralytics'
model as it is; `openvino`, `onnxruntime` (and `tensorrt`) run the live-vocabulary graph (`graph.LiveWorldGraph`),
exported once per weights and kept in the compiled-model cache: the text embeddings are an input, so a vocabulary
change never exports again. Everything after the head stays in ovdet.model.world, shared.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ovdet.backends.base import Backend, BuildInfo, Calibration, ExportedBackend
from ovdet.backends.cache import CompiledCache, compiled_dir
from ovdet.backends.table import IMAGES, OUTPUT, TABLE, TEXT, BackendSpec
from ovdet.errors import ModelError
from ovdet.util.device import device_type
from ovdet.options import BACKEND_ENV  # defined there so that the CLI parser needs no torch
from ovdet.options import BACKEND_PRECISIONS as PRECISIONS  # every precision of TABLE, in the order options list it
from ovdet.options import PRECISION_AUTO  # precision="auto" (or None): the backend's own choice

if TYPE_CHECKING:
    import torch

    from ovdet.backends.graph import LiveWorldGraph, export_onnx

__all__ = ["BACKENDS", "BACKEND_ENV", "PRECISIONS", "PRECISION_AUTO", "IMAGES", "OUTPUT", "TABLE", "TEXT", "Backend", "BackendChoice",
           "BackendSpec", "BuildInfo", "Calibration", "CompiledCache", "ExportedBackend", "LiveWorldGraph",
           "compiled_dir", "create_backend", "export_onnx", "resolve"]

BACKENDS = ("auto", *TABLE)  # what backend= accepts (ovdet.options.BACKENDS, for the CLI, is the same tuple)


@dataclass(frozen=True)
class BackendChoice:
    """What runs: backend name, device (by name: "cpu", "cuda:1"), precision, and why (`reason`: how backend `auto`
    chose; `precision_reason`: how the precision was chosen when none was asked for)."""

    name: str
    device_name: str
    precision: str
    reason: str = ""
    precision_reason: str = ""

    @property
    def device(self) -> torch.device:
        """The device as a torch.device (imports torch: the exported backends on a CPU never ask)."""
        import torch

        return torch.device(self.device_name)

    @property
    def device_type(self) -> str:
        """"cpu", "cuda" or "mps"."""
        return device_type(self.device_name)

    @property
    def spec(self) -> BackendSpec:
        """The table row of the chosen backend."""
        return TABLE[self.name]


def resolve(backend: str | None = "auto", device: str | torch.device = "auto", half: bool | None = None,
            precision: str | None = None) -> BackendChoice:
    """Pick the backend, device and precision that will run, or raise a ModelError that says what to change.

    `auto` (or None) is $OVDET_BACKEND when set, else OpenVINO on a CPU when it is installed, TensorRT on CUDA when
    installed, else torch. Precision `auto` (or None) is the backend's `auto_precision`: bf16 for OpenVINO on a CPU
    with native bf16, fp16 for torch / TensorRT on CUDA (half=False: fp32), fp32 elsewhere; `half=True` means
    precision fp16. A precision the backend's table row does not list is refused."""
    from ovdet.util import device as devices

    name = (backend or "auto").strip().lower()
    reason = ""
    if name == "auto" and os.environ.get(BACKEND_ENV, "").strip():
        name, reason = os.environ[BACKEND_ENV].strip().lower(), f"${BACKEND_ENV}"
    if name not in BACKENDS:
        raise ModelError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    if precision == PRECISION_AUTO:
        precision = None
    if precision is not None and precision not in PRECISIONS:
        raise ModelError(f"Unknown precision {precision!r}: use one of {', '.join((PRECISION_AUTO, *PRECISIONS))}.")
    if half is not None and precision is not None and bool(half) != (precision == "fp16"):
        raise ModelError(f"half={half} contradicts precision={precision!r}: give only one of them.")
    if half and precision is None:
        precision = "fp16"
    dev = devices.device_name(device or "auto")
    kind = devices.device_type(dev)
    spec = TABLE.get(name)
    if device in ("auto", None) and spec is not None and kind not in spec.devices and "cpu" in spec.devices:
        dev = kind = "cpu"  # auto: a backend that cannot run on the chosen device runs on the CPU
    if name == "auto":
        if kind == "cpu" and TABLE["openvino"].available():
            name, reason = "openvino", "auto: OpenVINO on a CPU"
        elif kind == "cuda" and TABLE["tensorrt"].available():
            name, reason = "tensorrt", "auto: TensorRT on CUDA"
        else:
            name = "torch"
            reason = ("auto: openvino is not installed" if kind == "cpu" else
                      "auto: tensorrt is not available" if kind == "cuda" else f"auto: {kind}")
    cls = TABLE[name].load()
    precision_reason = ""
    if precision is None:
        precision, precision_reason = cls.auto_precision(kind, half)
    cls.check_precision(precision)
    return BackendChoice(name, dev, precision, reason, precision_reason)


def create_backend(choice: BackendChoice, model: Any, model_id: Callable[[], str], threads: int | None = None,
                   calibration: Callable[[], Calibration] | None = None,
                   cache: CompiledCache | None = None) -> Backend:
    """The backend `choice` names, for `model` (a fused WorldModel): torch runs it, the others export it lazily."""
    cls = choice.spec.load()
    return cls(model, choice.precision, choice.device_name, threads, model_id=model_id, calibration=calibration,
               cache=cache)


def __getattr__(name: str) -> Any:
    """The export machinery (torch, ultralytics) is imported when first asked for, not with the backends."""
    if name in ("LiveWorldGraph", "export_onnx"):
        from ovdet.backends import graph

        return getattr(graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
