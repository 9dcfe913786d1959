"""TensorRT backend slot (fp16 / fp32 engines on CUDA): filled in by the TensorRT work; refuses clearly until then."""

from __future__ import annotations

from typing import Any

from ovdet.errors import ModelError


def available() -> bool:
    """False until the TensorRT backend is implemented, so backend='auto' never picks it."""
    return False


class TensorRTBackend:
    """Placeholder: constructing it raises a ModelError that names the backends that work today."""

    name = "tensorrt"

    def __init__(self, *args: Any, **kwargs: Any):
        raise ModelError("The tensorrt backend is not implemented yet: use backend='torch' (fp16 on a GPU) or "
                         "'onnxruntime' with onnxruntime-gpu.")
