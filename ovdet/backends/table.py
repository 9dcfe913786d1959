"""The backend table: one row per backend name (its runtime, devices, precisions, export format and class).

`resolve`, `create_backend` (ovdet.backends) and `ovdet export` (ovdet.jobs.export) read it; nothing else lists the
backends. The classes are named by module path and imported only when asked for, so reading the table imports no
runtime. ovdet.options keeps the names as stdlib tuples for the CLI parser; tests/test_backend_table.py checks that
they agree with this table.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

IMAGES, TEXT, OUTPUT = "images", "txt_feats", "output"  # tensor names of every exported graph (ovdet.backends.graph)


@dataclass(frozen=True)
class ExportFormat:
    """A file `ovdet export --format NAME` writes, which the backend of its row runs."""

    name: str
    suffix: str  # how a baked-vocabulary export's name ends: ultralytics' AutoBackend recognises it by that
    live_suffix: str  # the live-vocabulary graph's file
    precisions: tuple[str, ...]  # what the exported file can hold (bf16 is a runtime setting, not a file format)
    built_from: str | None = None  # the format it is converted from (None: written from the model itself)


@dataclass(frozen=True)
class BackendSpec:
    """One backend: what runs it (`runtime`, a package name: probed for `auto`, part of the compiled-cache key),
    where (`devices`: torch device types) and at which precisions, the export format whose file it runs, and its
    class (`module`.`cls`, a subclass of ovdet.backends.base.Backend)."""

    name: str
    runtime: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    export: ExportFormat | None
    module: str
    cls: str

    def load(self) -> type[Any]:
        """The backend class (imports its module; the runtime itself is imported when the backend is made)."""
        return getattr(importlib.import_module(self.module), self.cls)

    def installed(self) -> bool:
        """True when the runtime package can be found (not imported: probing stays cheap)."""
        return importlib.util.find_spec(self.runtime) is not None

    def available(self) -> bool:
        """Whether the backend can run here, as its module's `available()` says (the runtime is installed, and for
        TensorRT CUDA is usable): what backend='auto' asks before picking it."""
        return bool(importlib.import_module(self.module).available())


_IO = ("fp32", "fp16", "int8")  # every export format holds these
TABLE: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", "torch", ("cpu", "cuda", "mps"), ("fp32", "fp16"), None,
                "ovdet.backends.torch_backend", "TorchBackend"),
    BackendSpec("openvino", "openvino", ("cpu",), ("fp32", "bf16", "int8"),
                ExportFormat("openvino", "_openvino_model", ".xml", _IO, built_from="onnx"),
                "ovdet.backends.openvino_backend", "OpenVINOBackend"),
    BackendSpec("onnxruntime", "onnxruntime", ("cpu", "cuda"), ("fp32",), ExportFormat("onnx", ".onnx", ".onnx", _IO),
                "ovdet.backends.onnxruntime_backend", "ONNXRuntimeBackend"),
    BackendSpec("tensorrt", "tensorrt", ("cuda",), ("fp32", "fp16"),
                ExportFormat("engine", ".engine", ".engine", _IO, built_from="onnx"),
                "ovdet.backends.tensorrt_backend", "TensorRTBackend"),
)}

# What `ovdet export` writes, by format name: the formats others are converted from first (ONNX), then table order.
EXPORTS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in sorted(
    (spec.export for spec in TABLE.values() if spec.export is not None), key=lambda fmt: fmt.built_from is not None)}
EXPORT_PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for fmt in EXPORTS.values() for p in fmt.precisions))
