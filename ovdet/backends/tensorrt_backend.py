"""TensorRT backend: the live-vocabulary graph as a TensorRT engine on CUDA (fp16 or fp32), cached per GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from ovdet.backends import graph
from ovdet.backends.base import Calibration, ExportedBackend
from ovdet.backends.table import TABLE
from ovdet.backends.tensorrt import EngineRunner, Profile, build_engine, require_tensorrt
from ovdet.backends.tensorrt import available  # noqa: F401 - the check backend='auto' makes (TABLE's probe)
from ovdet.errors import ModelError


class TensorRTBackend(ExportedBackend):
    """Runs CUDA tensors through an engine built from the exported graph; one optimization profile covers batches
    1-16, sizes 32-1280 px and 1-1024 prompts (a shape outside it is a clear ModelError). Engines are specific to a
    GPU model and TensorRT version, which are part of the cache key."""

    spec = TABLE["tensorrt"]
    takes_arrays = False  # it runs CUDA tensors in place (run), never numpy

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device_type != "cuda":
            raise ModelError(f"The tensorrt backend runs on an NVIDIA GPU, not {self.device}: use device='cuda', or "
                             "backend='openvino' / 'torch' on a CPU.")
        require_tensorrt()  # a clear ModelError when tensorrt is missing
        self.profile = Profile()

    @classmethod
    def precision_message(cls, precision: str) -> str:
        return (f"The tensorrt backend runs fp16 or fp32, not {precision}: use precision fp16 (the fast one on a "
                "GPU), or backend='openvino' for bf16 / int8 on a CPU.")

    def kind(self, calibration: Calibration | None) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        gpu = torch.cuda.get_device_name(self.device).replace(" ", "_")
        return f"{self.precision}-{self.profile.key()}-{gpu}-sm{major}{minor}"

    def extra_packages(self, kind: str) -> tuple[str, ...]:
        return ("onnx",)

    def _build(self, folder: Path, kind: str, calibration: Calibration | None, txt_feats: torch.Tensor | None) -> None:
        onnx_path = graph.export_onnx(self.model, folder / "graph.onnx")
        embed = int(self.model.txt_feats.shape[-1])
        (folder / "model.engine").write_bytes(build_engine(onnx_path, self.precision, self.profile.imgsz, embed,
                                                           self.profile))
        onnx_path.unlink()

    def _load(self, folder: Path) -> EngineRunner:
        return EngineRunner((folder / "model.engine").read_bytes(), self.device, self.profile)

    def run(self, batch: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if self.build_info is None:
                self._prepare(txt_feats)
            return self._runner(batch, txt_feats)
