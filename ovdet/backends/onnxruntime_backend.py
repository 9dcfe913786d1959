"""ONNX Runtime backend: the live-vocabulary graph as ONNX, on the CPU execution provider or CUDA's, fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ovdet.backends.base import Calibration, ExportedBackend
from ovdet.backends.cache import require_module
from ovdet.backends.table import IMAGES, OUTPUT, TABLE, TEXT
from ovdet.errors import ModelError

INSTALL = 'pip install "ovdet[onnx]" (or pip install onnxruntime; onnxruntime-gpu for CUDA)'


def available() -> bool:
    """True when the onnxruntime package can be imported."""
    return ONNXRuntimeBackend.spec.installed()


class ONNXRuntimeBackend(ExportedBackend):
    """Runs the graph with ONNX Runtime; `threads` sets intra-op threads (inter-op 1, sequential execution)."""

    spec = TABLE["onnxruntime"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ort = require_module("onnxruntime", INSTALL, "The onnxruntime backend")
        if self.device_type == "cuda":
            if "CUDAExecutionProvider" not in self._ort.get_available_providers():
                raise ModelError("This onnxruntime has no CUDA execution provider: pip install onnxruntime-gpu, or "
                                 "use device='cpu'.")
            self.providers = [("CUDAExecutionProvider", {"device_id": int(self.device_name.partition(":")[2] or 0)}),
                              "CPUExecutionProvider"]
        elif self.device_type == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise ModelError(f"The onnxruntime backend runs on the CPU or CUDA, not {self.device_name}: use "
                             "device='cpu'.")

    @classmethod
    def precision_message(cls, precision: str) -> str:
        return (f"The onnxruntime backend runs fp32 only, not {precision}: use --backend openvino for bf16 or int8 on "
                "a CPU, --backend tensorrt (or torch) for fp16 on a GPU.")

    def extra_packages(self, kind: str) -> tuple[str, ...]:
        return ("onnx",)

    def _build(self, folder: Path, kind: str, calibration: Calibration | None, txt_feats: np.ndarray | None) -> None:
        from ovdet.backends import graph

        graph.export_onnx(self.model, folder / "model.onnx")

    def _load(self, folder: Path):
        ort = self._ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(str(folder / "model.onnx"), options, providers=self.providers)

    def _infer(self, images: np.ndarray, txt: np.ndarray) -> np.ndarray:
        return self._runner.run([OUTPUT], {IMAGES: images, TEXT: txt})[0]
