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
from typing import Any

import torch

from ovdet.backends.base import Backend, BuildInfo, Calibration, ExportedBackend
from ovdet.backends.cache import CompiledCache, compiled_dir
from ovdet.backends.graph import IMAGES, OUTPUT, TEXT, LiveWorldGraph, export_onnx
from ovdet.backends.table import TABLE, BackendSpec
from ovdet.errors import ModelError
from ovdet.options import BACKEND_ENV  # defined there so that the CLI parser needs no torch
from ovdet.options import BACKEND_PRECISIONS as PRECISIONS  # every precision of TABLE, in the order options list it
from ovdet.options import PRECISION_AUTO  # precision="auto" (or None): the backend's own choice

__all__ = ["BACKENDS", "BACKEND_ENV", "PRECISIONS", "PRECISION_AUTO", "IMAGES", "OUTPUT", "TABLE", "TEXT", "Backend", "BackendChoice",
           "BackendSpec", "BuildInfo", "Calibration", "CompiledCache", "ExportedBackend", "LiveWorldGraph",
           "compiled_dir", "create_backend", "export_onnx", "resolve"]

BACKENDS = ("auto", *TABLE)  # what backend= accepts (ovdet.options.BACKENDS, for the CLI, is the same tuple)


@dataclass(frozen=True)
class BackendChoice:
    """What runs: backend name, device, precision, and why (`reason`: how backend `auto` chose;
    `precision_reason`: how the precision was chosen when none was asked for)."""

    name: str
    device: torch.device
    precision: str
    reason: str = ""
    precision_reason: str = ""

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
    from ovdet.util.device import select_device

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
    dev = select_device(device or "auto")
    spec = TABLE.get(name)
    if device in ("auto", None) and spec is not None and dev.type not in spec.devices and "cpu" in spec.devices:
        dev = torch.device("cpu")  # auto: a backend that cannot run on the chosen device runs on the CPU
    if name == "auto":
        if dev.type == "cpu" and TABLE["openvino"].available():
            name, reason = "openvino", "auto: OpenVINO on a CPU"
        elif dev.type == "cuda" and TABLE["tensorrt"].available():
            name, reason = "tensorrt", "auto: TensorRT on CUDA"
        else:
            name = "torch"
            reason = ("auto: openvino is not installed" if dev.type == "cpu" else
                      "auto: tensorrt is not available" if dev.type == "cuda" else f"auto: {dev.type}")
    cls = TABLE[name].load()
    precision_reason = ""
    if precision is None:
        precision, precision_reason = cls.auto_precision(dev, half)
    cls.check_precision(precision)
    return BackendChoice(name, dev, precision, reason, precision_reason)


def create_backend(choice: BackendChoice, model: Any, model_id: Callable[[], str], threads: int | None = None,
                   calibration: Callable[[], Calibration] | None = None,
                   cache: CompiledCache | None = None) -> Backend:
    """The backend `choice` names, for `model` (a fused WorldModel): torch runs it, the others export it lazily."""
    cls = choice.spec.load()
    return cls(model, choice.precision, choice.device, threads, model_id=model_id, calibration=calibration,
               cache=cache)
