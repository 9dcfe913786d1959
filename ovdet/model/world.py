"""The region–text model: YOLO-World weights and text embeddings, letterbox → backend forward → shared post (NMS).

Backends that take numpy arrays (OpenVINO, ONNX Runtime) run with ovdet.model.boxes' numpy letterbox and NMS, equal
to ultralytics' own: a warm start from the compiled-model cache then never imports torch or ultralytics (2-3 s).
The torch and TensorRT backends run on tensors, with ultralytics' letterbox and NMS."""

from __future__ import annotations

import platform
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovdet.backends.base import is_torch_module
from ovdet.errors import ModelError, OVDetWarning
from ovdet.model import boxes
from ovdet.model.facts import EmbeddedTower, ModelFacts, read_facts, write_facts
from ovdet.util.device import cpu_float32
from ovdet.util.hashing import cached_sha256, state_digest
from ovdet.weights.registry import resolve_detector

if TYPE_CHECKING:
    import torch
    from ultralytics.nn.tasks import WorldModel

DEFAULT_IMGSZ = 640  # what the published YOLO-World models were trained at
MAX_CHECKPOINT_IMGSZ = 4096  # the largest train_args.imgsz taken from a checkpoint (real ones say 640 or 1280)
MAX_IMGSZ = 8192  # the largest inference size ovdet accepts (one 8192² float image is 0.8 GB)
CONFIG_TRUST_HINT = ("If you trust this config and where it came from, pass --trust-weights (CLI) or "
                     "trust_weights=True (Python): ultralytics then builds it unchecked, running what it names.")


def _channels_last_helps(device: torch.device) -> bool:
    """On x86 CPUs with oneDNN, channels-last convolutions are faster (ultralytics predict makes the same choice)."""
    import torch

    return (device.type == "cpu" and platform.machine() in {"AMD64", "x86_64"}
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def load_world_checkpoint(path: Path, trust_weights: bool = False) -> tuple[WorldModel, dict[str, Any]]:
    """Read a YOLO-World checkpoint (.pt, or a .safetensors + .json pair) without running code from the file.

    A file that would need globals outside ovdet's allowlist raises WeightsUnsafeError unless `trust_weights`
    (which runs code from the file); a truncated or foreign file raises WeightsCorruptError.
    """
    from ovdet.weights.checkpoint import load_checkpoint, load_safetensors_pair, world_model_of

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors_pair(path)
    ckpt = load_checkpoint(path, trust=trust_weights)
    return world_model_of(ckpt, path), ckpt


def world_model_from_yaml(source: str | Path, trust_weights: bool = False) -> WorldModel:
    """A random-weight WorldModel from a model yaml (path or ultralytics config name), read as data: yaml.safe_load,
    ovdet's config schema, no eval. `trust_weights` hands the file to ultralytics unchecked (it runs what it names)."""
    from ultralytics.nn.tasks import WorldModel

    from ovdet.weights.checkpoint import _quiet_ultralytics
    from ovdet.weights.modelconfig import build_world_model, read_model_yaml

    with _quiet_ultralytics():
        if not trust_weights:
            return build_world_model(read_model_yaml(source, CONFIG_TRUST_HINT), str(source))
        try:
            return WorldModel(str(source), verbose=False)
        except FileNotFoundError as exc:
            raise ModelError(f"Model config {str(source)!r} not found: give a path or an ultralytics config name "
                             "such as 'yolov8s-worldv2.yaml'.") from exc


def checkpoint_imgsz(ckpt: dict[str, Any], source: str | Path) -> int:
    """The size a checkpoint says it was trained at (train_args.imgsz): the default inference size.

    It is only a default, so a value that is no size in 32..MAX_CHECKPOINT_IMGSZ (a 40000 would letterbox every image
    into 4.8 GB) gives the YOLO-World default 640 and a warning naming it, instead of refusing good weights.
    """
    size, warning = _trained_imgsz(ckpt, source)
    if warning:
        warnings.warn(warning, OVDetWarning, stacklevel=3)
    return size


def _trained_imgsz(ckpt: dict[str, Any], source: str | Path) -> tuple[int, str | None]:
    """checkpoint_imgsz's size, and the warning it gives (None: none)."""
    args = ckpt.get("train_args")
    raw = args.get("imgsz") if isinstance(args, dict) else None
    if raw is None:
        return DEFAULT_IMGSZ, None
    sizes = raw if isinstance(raw, (list, tuple)) else [raw]
    if sizes and all(isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= MAX_CHECKPOINT_IMGSZ
                     for v in sizes):
        return max(sizes), None
    return DEFAULT_IMGSZ, (f"{source} says it was trained at imgsz {str(raw)[:60]}, which is not a size in 32.."
                           f"{MAX_CHECKPOINT_IMGSZ}; detecting at {DEFAULT_IMGSZ} instead (pass --imgsz / imgsz= to "
                           "choose).")


def check_imgsz(imgsz: Any) -> int:
    """An inference size a caller asked for, as an int; ModelError beyond MAX_IMGSZ (memory grows with its square)."""
    try:
        size = int(imgsz)
        ok = size == imgsz and not isinstance(imgsz, bool) and 1 <= size <= MAX_IMGSZ
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ModelError(f"imgsz {imgsz!r} is not an image size in 1..{MAX_IMGSZ} pixels: use a multiple of 32 such "
                         "as 640 (the size YOLO-World was trained at) or 1280.")
    return size


class WorldDetector:
    """A YOLO-World model on a device with its class embeddings set: images in, boxes out (N×6 per image).

    `model` is a WorldModel, or (with `facts`, for a backend that runs an exported model) a function that reads it:
    it is then called only when the weights are needed (`model`: a compiled model to build, region exemplars, a
    worker payload), so a warm start from the compiled-model cache never reads them."""

    def __init__(self, model: WorldModel | Callable[[], WorldModel], name: str, device: str | torch.device = "auto",
                 half: bool | None = None, digest: str | None = None, text_encoder_state: Any = None,
                 train_imgsz: int = 640, backend: Any = "torch", precision: str | None = None,
                 threads: int | None = None, calib: str | Path | None = None, calib_imgsz: int | None = None,
                 facts: ModelFacts | None = None):
        from ovdet.backends import BackendChoice, create_backend, resolve

        choice = backend if isinstance(backend, BackendChoice) else resolve(backend, device, half, precision)
        self.device_name = choice.device_name
        self.half = choice.name == "torch" and choice.precision == "fp16"
        self._on_device = choice.name == "torch"  # the other backends export a CPU copy and run it in their runtime
        self._model: WorldModel | None = None
        self._read_model: Callable[[], WorldModel] | None = None
        self._model_lock = threading.Lock()
        self._txt: np.ndarray | None = None  # [1, K, D] float32: the class embeddings every forward gets
        self._txt_on_device: torch.Tensor | None = None  # the same on the torch backend's device, in its precision
        if is_torch_module(model):
            self._model = self._ready(model)
            self.stride = max(int(self._model.stride.max()), 32)
            self.embed_dim = int(self._model.txt_feats.shape[-1])
        elif facts is None:
            raise TypeError("WorldDetector(model=<function>) needs the model's facts (stride, embed_dim)")
        else:
            self._read_model = model
            self.stride, self.embed_dim = facts.stride, facts.embed_dim
            if self._on_device:  # torch runs the weights themselves: read them now
                self._model = self._ready(model())
        self.name = name
        self.text_encoder_state = text_encoder_state
        self._digest = digest
        self.train_imgsz = train_imgsz  # the size it was trained at: the best default inference size
        self._columns: np.ndarray | None = None  # embedding row -> class index (-1: negative); None: row i is class i
        self._num_classes = 0
        self._reduce = "max"
        self.backend_reason = choice.reason
        self.precision_reason = choice.precision_reason

        def calibration():
            from ovdet.backends.calib import make_calibration

            return make_calibration(calib, calib_imgsz or train_imgsz, self.letterbox)

        self.backend = create_backend(choice, self._model if self._model is not None else lambda: self.model,
                                      lambda: self.model_id, threads=threads, calibration=calibration)

    def _ready(self, model: WorldModel) -> WorldModel:
        """The model fused, in eval mode, frozen, on the device in the precision that runs it (torch), else on the
        CPU in fp32 for the exported backends to export."""
        import torch

        model = model.fuse(verbose=False).eval().to(self.device if self._on_device else torch.device("cpu"))
        model = model.half() if self.half else model.float()
        if self._on_device and _channels_last_helps(self.device):
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        if self._txt is not None:
            model.txt_feats = self._txt_feats
        return model

    @property
    def device(self) -> torch.device:
        """The device it runs on, as a torch.device (imports torch; `device_name` is the same without it)."""
        import torch

        return torch.device(self.device_name)

    @property
    def _txt_feats(self) -> torch.Tensor | None:
        """The class embeddings as the torch model takes them: [1, K, D] on its device, in its precision."""
        if self._txt is None:
            return None
        if self._txt_on_device is None:
            import torch

            self._txt_on_device = torch.from_numpy(self._txt).to(self.device, torch.float16 if self.half else
                                                                torch.float32)
        return self._txt_on_device

    @property
    def model(self) -> WorldModel:
        """The fused torch model; a detector that started from a checkpoint's facts reads it here, once."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self._ready(self._read_model())
        return self._model

    @property
    def model_loaded(self) -> bool:
        """Whether the weights are in memory (a warm start on an exported backend never reads them)."""
        return self._model is not None

    def describe(self) -> str:
        """Which backend runs, in words: e.g. "openvino fp32, 2 threads, cpu (auto: OpenVINO on a CPU; precision auto:
        no native bf16 on this CPU)"."""
        reasons = "; ".join(r for r in (self.backend_reason, self.precision_reason) if r)
        why = f" ({reasons})" if reasons else ""
        return f"{self.backend.describe()}, {self.device_name}{why}"

    @classmethod
    def load(cls, source: str | Path | WorldModel, device: str | torch.device = "auto",
             half: bool | None = None, trust_weights: bool = False, **backend: Any) -> WorldDetector:
        """Load from a checkpoint path, a registry name, an ultralytics yaml config (random weights) or a model.

        Checkpoints are read without running code from them; `trust_weights=True` allows files that need it.
        `backend` keywords (backend, precision, threads, calib, calib_imgsz) choose what runs the forward pass."""
        if is_torch_module(source):
            from ultralytics.nn.tasks import WorldModel

            if isinstance(source, WorldModel):
                return cls(source, type(source).__name__, device, half, **backend)
        text = str(source)
        if text.endswith((".yaml", ".yml")):
            return cls(world_model_from_yaml(text, trust_weights), Path(text).name, device, half, **backend)
        path = resolve_detector(text)
        facts = read_facts(path) if path.suffix != ".safetensors" else None  # a pair: its .json is not in the key
        if facts is not None:
            from ovdet.backends import resolve

            choice = resolve(backend.pop("backend", "torch"), device, half, backend.pop("precision", None))
            if choice.name != "torch":  # an exported backend: the weights are read only if it has to build
                return cls._from_facts(path, facts, choice, device, half, trust_weights, **backend)
            backend["backend"] = choice
        from ovdet.weights.checkpoint import TEXT_ENCODER_KEY

        model, ckpt = load_world_checkpoint(path, trust_weights=trust_weights)
        sha = cached_sha256(path)  # after the checks: a refused file leaves nothing behind
        train_imgsz, warning = _trained_imgsz(ckpt, path)
        if warning:
            warnings.warn(warning, OVDetWarning, stacklevel=2)
        tower = ckpt.get(TEXT_ENCODER_KEY)
        if facts is None and path.suffix != ".safetensors" and not trust_weights:  # never skip the checks it needs
            from ovdet.text.cache import state_identity

            write_facts(path, ModelFacts(sha256=sha, stride=max(int(model.stride.max()), 32),
                                         embed_dim=int(model.txt_feats.shape[-1]), train_imgsz=train_imgsz,
                                         text_tower=state_identity(tower) if tower is not None else None,
                                         imgsz_warning=warning))
        return cls(model, path.stem, device, half, digest=sha[:16], text_encoder_state=tower,
                   train_imgsz=train_imgsz, **backend)

    @classmethod
    def _from_facts(cls, path: Path, facts: ModelFacts, choice: Any, device: str | torch.device,
                    half: bool | None, trust_weights: bool, **backend: Any) -> WorldDetector:
        """A detector whose checkpoint is read (once, with the same safety checks) only when first needed."""
        if facts.imgsz_warning:
            warnings.warn(facts.imgsz_warning, OVDetWarning, stacklevel=3)
        read: dict[str, Any] = {}

        def part(key: str) -> Any:
            """The model or the tower state, each handed out once: one read serves both, and none is kept here."""
            if key not in read:
                from ovdet.weights.checkpoint import TEXT_ENCODER_KEY

                model, ckpt = load_world_checkpoint(path, trust_weights=trust_weights)
                read.update(model=model, tower=ckpt.get(TEXT_ENCODER_KEY))
            return read.pop(key)

        def tower() -> Any:
            state = part("tower")
            if state is None:
                raise ModelError(f"{path} no longer holds the text tower it had when first read: it changed while "
                                 "in use; run again.")
            return state

        embedded = EmbeddedTower(facts.text_tower, tower) if facts.text_tower is not None else None
        return cls(lambda: part("model"), path.stem, device, half, digest=facts.sha256[:16],
                   text_encoder_state=embedded, train_imgsz=facts.train_imgsz, backend=choice, facts=facts, **backend)

    @property
    def model_id(self) -> str:
        """`name@sha` of the weights: stable across runs, different for different weights."""
        if self._digest is None:
            self._digest = state_digest(self.model.state_dict())
        return f"{self.name}@{self._digest}"

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def set_text_embeddings(self, embeddings: np.ndarray | torch.Tensor, columns: Sequence[int] | None = None,
                            reduce: str = "max") -> None:
        """Use these [K, D] L2-normalized text embeddings (numpy, or a torch tensor) for every following forward.

        Without `columns`, row i scores class i. With them, row i scores class `columns[i]` (-1: a negative
        prompt): a class scores the max (or mean, `reduce`) of its rows, and a box whose best row is a negative
        is dropped; classes are numbered 0..C-1 and each needs at least one row.
        """
        embeddings = cpu_float32(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ModelError(f"Class embeddings must have shape [C, {self.embed_dim}], got {tuple(embeddings.shape)}: "
                             "the text tower does not match this detector.")
        cols = None
        if columns is not None:
            cols = np.asarray(list(columns), dtype=np.int64)
            num = int(cols.max()) + 1 if len(cols) else 0
            if len(cols) != len(embeddings) or num < 1 or bool((cols < -1).any()) \
                    or set(cols[cols >= 0].tolist()) != set(range(num)) or reduce not in ("max", "mean"):
                raise ModelError(f"columns must give each of the {len(embeddings)} embedding rows a class 0..C-1 "
                                 f"(every class at least once) or -1, and reduce must be max or mean; got "
                                 f"{cols.tolist()}, {reduce!r}.")
        self._num_classes = num if cols is not None else int(embeddings.shape[0])
        self._txt, self._txt_on_device = embeddings[None].copy(), None  # a copy: the caller's array may change
        self._columns, self._reduce = cols, reduce
        if self._model is not None:  # the Ray engine ships these with the weights (a model read later gets them too)
            self._model.txt_feats = self._txt_feats

    def letterbox(self, images: list[np.ndarray], imgsz: int) -> np.ndarray:
        """Letterbox BGR uint8 images exactly as ultralytics predict does, in numpy: a float32 RGB batch in 0..1 (what
        the backends that take arrays run, and int8 calibrates on)."""
        return boxes.letterbox(images, check_imgsz(imgsz), self.stride)

    def preprocess(self, images: list[np.ndarray], imgsz: int) -> torch.Tensor:
        """Letterbox BGR uint8 images exactly as ultralytics predict does; returns a normalized RGB batch on the
        device, in the torch model's precision."""
        import torch
        from ultralytics.data.augment import LetterBox

        imgsz = check_imgsz(imgsz)
        same_shapes = len({im.shape for im in images}) == 1
        letterbox = LetterBox((imgsz, imgsz), auto=same_shapes, stride=self.stride)
        boxed = [letterbox(image=im) for im in images]
        batch = torch.from_numpy(boxed[0]).unsqueeze(0) if len(boxed) == 1 else torch.from_numpy(np.stack(boxed))
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).flip(1)
        return (batch.half() if self.half else batch.float()).div_(255)

    def class_scores(self, preds: torch.Tensor | tuple, conf: float,
                     class_conf: Sequence[float] | None = None) -> tuple[torch.Tensor, float]:
        """Raw head output [B, 4+K, A] → [B, 4+C, A] class scores, and the conf threshold for NMS.

        Rows reduce to their classes; anchors whose best row is a negative (ties included) get all-zero scores,
        and so do anchors whose best class scores at or below that class's `class_conf`, so that each box keeps
        one class and NMS sees only boxes that pass their own class's threshold.
        """
        import torch

        preds = preds[0] if isinstance(preds, (list, tuple)) else preds
        xywh, scores = preds[:, :4], preds[:, 4:]
        if self._columns is not None:
            columns = torch.from_numpy(self._columns).to(scores.device)
            positive = columns >= 0
            rows = scores[:, positive]
            index = columns[positive].view(1, -1, 1).expand_as(rows)
            shape = (scores.shape[0], self.num_classes, scores.shape[2])
            reduced = rows.new_zeros(shape).scatter_reduce_(1, index, rows, reduce="amax" if self._reduce == "max"
                                                            else "mean", include_self=False)
            if not bool(positive.all()):
                beaten = scores[:, ~positive].amax(1) >= rows.amax(1)
                reduced = reduced.masked_fill(beaten[:, None], 0)
            scores = reduced
        if class_conf is not None:
            thresholds = torch.as_tensor(class_conf, dtype=scores.dtype, device=scores.device)
            best, best_class = scores.max(1)
            scores = scores.masked_fill((best <= thresholds[best_class])[:, None], 0)
            conf = float(min(class_conf))
        return torch.cat((xywh, scores), 1), conf

    def __call__(self, images: list[np.ndarray], imgsz: int = 640, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300, class_conf: Sequence[float] | None = None) -> list[np.ndarray]:
        """Detect in BGR uint8 images; per image an N×6 float32 array (x1, y1, x2, y2, score, class) in its pixels.

        `class_conf` (one per class) are per-class thresholds that replace `conf` for their class.
        """
        if self._txt is None:
            raise ModelError("No classes set: call set_classes([...]) before detecting.")
        if not self.backend.takes_arrays:
            return self._call_tensors(images, imgsz, conf, iou, max_det, class_conf)
        batch = self.letterbox(images, imgsz)
        preds = self.backend.run_arrays(batch, self._txt)
        if self._columns is not None or class_conf is not None:
            preds, conf = boxes.class_scores(preds, conf, self._columns, self.num_classes, self._reduce, class_conf)
        out = []
        for det, im in zip(boxes.non_max_suppression(preds, conf, iou, max_det), images):
            det[:, :4] = boxes.scale_boxes(batch.shape[2:], det[:, :4], im.shape)
            out.append(det)
        return out

    def _call_tensors(self, images: list[np.ndarray], imgsz: int, conf: float, iou: float, max_det: int,
                      class_conf: Sequence[float] | None) -> list[np.ndarray]:
        """__call__ on torch tensors on the device, with ultralytics' letterbox and NMS."""
        import torch
        import torchvision  # noqa: F401 - ultralytics' NMS is then torchvision's (as in its predict, and as boxes)
        from ultralytics.utils import nms, ops

        with torch.inference_mode():
            batch = self.preprocess(images, imgsz)
            preds = self.backend.run(batch, self._txt_feats)
            if self._columns is not None or class_conf is not None:
                preds, conf = self.class_scores(preds, conf, class_conf)
            kept = nms.non_max_suppression(preds, conf, iou, max_det=max_det)
            out = []
            for det, im in zip(kept, images):
                det[:, :4] = ops.scale_boxes(batch.shape[2:], det[:, :4], im.shape)
                out.append(det.float().cpu().numpy())
        return out

