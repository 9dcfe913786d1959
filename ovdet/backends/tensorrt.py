"""TensorRT engines of the live-vocabulary graph (fp32 or fp16, dynamic batch/H/W/K): build and run; the backend that
caches them is ovdet.backends.tensorrt_backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ovdet.backends.graph import IMAGES, OUTPUT, TEXT
from ovdet.errors import ModelError

INSTALL = 'pip install tensorrt (or pip install "ovdet[tensorrt]"), on a machine with an NVIDIA GPU and driver'


def available() -> bool:
    """True when tensorrt imports and CUDA is usable: backend='auto' picks TensorRT on CUDA only then."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def require_tensorrt():
    """The tensorrt module, or a ModelError that says what is missing (CUDA, or the package)."""
    if not torch.cuda.is_available():
        raise ModelError("TensorRT runs on an NVIDIA GPU and CUDA is not available here: use backend='openvino' or "
                         "'torch' on a CPU.")
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelError(f"TensorRT is not installed: {INSTALL}.") from exc
    return tensorrt


@dataclass(frozen=True)
class Profile:
    """The shapes an engine accepts (TensorRT optimization profile): every axis between its min and max, fastest at
    opt. Sizes are multiples of the stride."""

    imgsz: int = 640  # opt height and width
    max_batch: int = 16
    min_size: int = 32
    max_size: int = 1280
    opt_classes: int = 80
    max_classes: int = 1024

    def key(self) -> str:
        return (f"b{self.max_batch}-s{self.min_size}-{self.imgsz}-{self.max_size}-k{self.opt_classes}-"
                f"{self.max_classes}")


def build_engine(onnx_path: str | Path, precision: str = "fp32", imgsz: int = 640, embed_dim: int = 512,
                 profile: Profile | None = None, workspace_gb: float = 4.0) -> bytes:
    """Build a serialized TensorRT engine from the live graph's ONNX file, for this machine's GPU.

    Inputs `images` [B,3,H,W] and `txt_feats` [1..B, K, D] stay float32 (fp16 runs inside), output [B,4+K,A]."""
    trt = require_tensorrt()
    if precision not in ("fp32", "fp16"):
        raise ModelError(f"The TensorRT engine is built in fp32 or fp16, not {precision}: use precision fp16 (the "
                         "fast one on a GPU) or fp32.")
    profile = profile or Profile(imgsz=max(imgsz, 32), max_size=max(1280, imgsz))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # TensorRT 8; implicit in 10
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT could not parse the exported graph ({errors}): update tensorrt, or use "
                         "backend='torch' on this GPU.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 convolutions round to 10-bit mantissas
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 dropped weak typing (ovdet[tensorrt] asks for 10.x)
            raise ModelError(f"TensorRT {trt.__version__} builds fp16 only from strongly typed graphs: install "
                             'TensorRT 10 (pip install "tensorrt>=10,<11"), or use precision fp32.')
        if not getattr(builder, "platform_has_fast_fp16", True):
            raise ModelError("This GPU has no fast fp16: use precision fp32 with the tensorrt backend.")
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = builder.create_optimization_profile()
    p = profile
    shapes.set_shape(IMAGES, (1, 3, p.min_size, p.min_size), (1, 3, p.imgsz, p.imgsz),
                     (p.max_batch, 3, p.max_size, p.max_size))
    shapes.set_shape(TEXT, (1, 1, embed_dim), (1, p.opt_classes, embed_dim), (p.max_batch, p.max_classes, embed_dim))
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError("TensorRT failed to build the engine (see its log above): try precision fp32, a smaller "
                         "profile, or backend='torch'.")
    return bytes(serialized)


class EngineRunner:
    """A deserialized engine and its execution context: runs CUDA tensors in place, on the current stream."""

    def __init__(self, engine_bytes: bytes, device: torch.device, profile: Profile | None = None):
        trt = require_tensorrt()
        self.device = device
        self.profile = profile
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise ModelError("TensorRT could not load the cached engine (another TensorRT version or GPU?): "
                                 "clear it with `ovdet cache clear` and run again.")
            self.context = self.engine.create_execution_context()

    def check(self, batch: int, height: int, width: int, classes: int) -> None:
        """Refuse shapes outside the engine's profile with what to change, instead of TensorRT's own error."""
        p = self.profile
        if p is None:
            return
        if not (1 <= batch <= p.max_batch and p.min_size <= min(height, width) and max(height, width) <= p.max_size
                and 1 <= classes <= p.max_classes):
            raise ModelError(f"The TensorRT engine takes batches of 1-{p.max_batch}, sizes {p.min_size}-{p.max_size} "
                             f"px and 1-{p.max_classes} prompts; got batch {batch}, {height}x{width}, {classes} "
                             "prompts: use a smaller batch, imgsz or vocabulary.")

    def __call__(self, images: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32).contiguous()
        txt = txt_feats.to(self.device, torch.float32).contiguous()
        self.check(images.shape[0], images.shape[2], images.shape[3], txt.shape[1])
        self.context.set_input_shape(IMAGES, tuple(images.shape))
        self.context.set_input_shape(TEXT, tuple(txt.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=torch.float32, device=self.device)
        for name, tensor in ((IMAGES, images), (TEXT, txt), (OUTPUT, out)):
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ModelError("TensorRT failed to run the engine: see its log above.")
        return out
