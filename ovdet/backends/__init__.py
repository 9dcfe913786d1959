"""Backends: the forward pass behind one protocol (letterboxed batch + text embeddings → raw head output [B,4+K,A]).

`torch` runs ultralytics' model as it is; `openvino`, `onnxruntime` (and `tensorrt`) run the live-vocabulary graph
(`graph.LiveWorldGraph`), exported once per weights and kept in the compiled-model cache: the text embeddings are an
input, so a vocabulary change never exports again. Everything after the head stays in ovdet.model.world, shared.
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
from ovdet.errors import ModelError
from ovdet.options import BACKEND_ENV, BACKENDS  # defined there so that the CLI parser needs no torch
from ovdet.options import BACKEND_PRECISIONS as PRECISIONS

__all__ = ["BACKENDS", "BACKEND_ENV", "PRECISIONS", "IMAGES", "OUTPUT", "TEXT", "Backend", "BackendChoice",
           "BuildInfo", "Calibration", "CompiledCache", "ExportedBackend", "LiveWorldGraph", "compiled_dir",
           "create_backend", "export_onnx", "resolve"]


@dataclass(frozen=True)
class BackendChoice:
    """What runs: backend name, device, precision, and why (`auto` tells how it chose)."""

    name: str
    device: torch.device
    precision: str
    reason: str = ""


def _runtime_available(name: str) -> bool:
    if name == "openvino":
        from ovdet.backends.openvino_backend import available
    elif name == "onnxruntime":
        from ovdet.backends.onnxruntime_backend import available
    elif name == "tensorrt":
        from ovdet.backends.tensorrt import available
    else:
        return True
    return available()


def resolve(backend: str | None = "auto", device: str | torch.device = "auto", half: bool | None = None,
            precision: str | None = None) -> BackendChoice:
    """Pick the backend, device and precision that will run, or raise a ModelError that says what to change.

    `auto` (or None) is $OVDET_BACKEND when set, else OpenVINO on a CPU when it is installed, TensorRT on CUDA when
    installed, else torch. Precision defaults to fp16 for torch / TensorRT on CUDA (half=False: fp32), fp32
    elsewhere; `half=True` means precision fp16."""
    from ovdet.util.device import select_device

    name = (backend or "auto").strip().lower()
    reason = ""
    if name == "auto" and os.environ.get(BACKEND_ENV, "").strip():
        name, reason = os.environ[BACKEND_ENV].strip().lower(), f"${BACKEND_ENV}"
    if name not in BACKENDS:
        raise ModelError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    if precision is not None and precision not in PRECISIONS:
        raise ModelError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if half is not None and precision is not None and bool(half) != (precision == "fp16"):
        raise ModelError(f"half={half} contradicts precision={precision!r}: give only one of them.")
    if half and precision is None:
        precision = "fp16"
    dev = select_device(device or "auto")
    if device in ("auto", None) and name in ("openvino", "onnxruntime") and not (name == "onnxruntime"
                                                                              and dev.type == "cuda"):
        dev = torch.device("cpu")  # auto: these run on the CPU (ONNX Runtime on CUDA when there is one)
    if name == "auto":
        if dev.type == "cpu" and _runtime_available("openvino"):
            name, reason = "openvino", "auto: OpenVINO on a CPU"
        elif dev.type == "cuda" and _runtime_available("tensorrt"):
            name, reason = "tensorrt", "auto: TensorRT on CUDA"
        else:
            name = "torch"
            reason = ("auto: openvino is not installed" if dev.type == "cpu" else
                      "auto: tensorrt is not available" if dev.type == "cuda" else f"auto: {dev.type}")
    if precision is None:
        precision = "fp16" if name in ("torch", "tensorrt") and dev.type == "cuda" and half is not False else "fp32"
    return BackendChoice(name, dev, precision, reason)


def create_backend(choice: BackendChoice, model: Any, model_id: Callable[[], str], threads: int | None = None,
                   calibration: Callable[[], Calibration] | None = None,
                   cache: CompiledCache | None = None) -> Backend:
    """The backend `choice` names, for `model` (a fused WorldModel): torch runs it, the others export it lazily."""
    if choice.name == "torch":
        from ovdet.backends.torch_backend import TorchBackend

        return TorchBackend(model, choice.precision, choice.device, threads)
    if choice.name == "tensorrt":
        from ovdet.backends.tensorrt_backend import TensorRTBackend as cls
    elif choice.name == "openvino":
        from ovdet.backends.openvino_backend import OpenVINOBackend as cls
    else:
        from ovdet.backends.onnxruntime_backend import ONNXRuntimeBackend as cls
    threads = int(threads) if threads else torch.get_num_threads()
    return cls(model, model_id, choice.precision, threads, choice.device, calibration=calibration, cache=cache)
