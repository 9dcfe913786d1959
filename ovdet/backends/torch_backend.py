"""Torch backend: ultralytics' fused WorldModel on its device, as ovdet always ran it (fp32, or fp16 on a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ovdet.backends.base import Backend, Calibration
from ovdet.backends.cache import CompiledCache
from ovdet.backends.table import TABLE
from ovdet.errors import ModelError


def available() -> bool:
    """Always True: torch is one of ovdet's own dependencies."""
    return True


class TorchBackend(Backend):
    """`WorldModel.predict(batch, txt_feats=...)` with the head's class count set from the embeddings.

    `threads` given sets torch's intra-op threads for the process; otherwise torch's current count is kept. The
    compiled-model arguments (model_id, calibration, cache) are not used: nothing is exported."""

    spec = TABLE["torch"]

    takes_arrays = False  # it runs torch tensors on its device

    def __init__(self, model: Any, precision: str, device: str | torch.device, threads: int | None = None, *,
                 model_id: Callable[[], str] | None = None, calibration: Callable[[], Calibration] | None = None,
                 cache: CompiledCache | None = None):
        super().__init__(model, precision, device, threads)
        if precision == "fp16" and self.device_type == "cpu":
            raise ModelError("fp16 needs a GPU: fp16 convolutions are not supported on CPU; use precision fp32, or "
                             "bf16 / int8 with --backend openvino.")
        if threads is not None:
            torch.set_num_threads(int(threads))

    @classmethod
    def precision_message(cls, precision: str) -> str:
        return (f"The torch backend runs fp32 (or fp16 on a GPU), not {precision}: use backend='openvino' "
                "(--backend openvino) for bf16 or int8 on a CPU.")

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def run(self, batch: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
        self.model.model[-1].nc = int(txt_feats.shape[1])
        preds = self.model.predict(batch, txt_feats=txt_feats)
        return preds[0] if isinstance(preds, (list, tuple)) else preds

    def __repr__(self) -> str:
        return f"TorchBackend({self.precision}, {self.device}, threads={self.threads})"
