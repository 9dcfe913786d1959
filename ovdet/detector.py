"""`OVDetector`: the public facade. Name classes in words, get `supervision.Detections`. Holds no I/O."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import supervision as sv

from ovdet.config import DetectorConfig
from ovdet.text.cache import LazyTextEncoder
from ovdet.errors import ClassSpecError, ModelError
from ovdet.text.prompts import ClassSpec, parse_classes
from ovdet.text.exemplars import Exemplar
from ovdet.model.exemplar_encoder import ExemplarEncoder
from ovdet.media.sources import load_image
from ovdet.tiling import TileSpec, detect_tiled, tile_source, tile_spec
from ovdet.masks.base import MaskPart, Segmenter, paste
from ovdet.masks.regions import segment_windows
from ovdet.masks.rle import DATA_KEY as MASK_RLE_KEY
from ovdet.masks.rle import encode_part
from ovdet.masks.table import create_segmenter
from ovdet.util.device import cpu_float32
from ovdet.util.hashing import state_digest
from ovdet.model.world import WorldDetector

if TYPE_CHECKING:  # torch is imported only where a torch model or tensor is used, not by a warm exported backend
    import torch

    from ovdet.text.tower import TextEncoder


def parse_class_names(classes: str | Sequence[str]) -> list[str]:
    """Validate a class list (or a comma-separated string): non-empty, no blanks, no duplicates."""
    if isinstance(classes, str):
        classes = classes.split(",")
    if not isinstance(classes, Sequence) or not all(isinstance(c, str) for c in classes):
        raise ClassSpecError(f"Classes must be a list of strings such as ['person', 'bus'], got {classes!r}.")
    names = [c.strip() for c in classes]
    if not names:
        raise ClassSpecError("The class list is empty: name at least one thing to find, e.g. ['person'].")
    blank = [i for i, n in enumerate(names) if not n]
    if blank:
        raise ClassSpecError(f"Class name at position {blank[0]} is blank: remove it or give it a name.")
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.lower().split())
        if key in seen:
            raise ClassSpecError(f"Class {name!r} is listed twice (as {seen[key]!r} too): each class once, please.")
        seen[key] = name
    return names


@dataclass
class DetectorPayload:
    """What another process needs to rebuild a detector with its classes (the Ray engine ships it to every worker
    once): the weights as a CPU float32 WorldModel, the class spec, one embedding row per spec column, the image
    size."""

    model: Any  # ultralytics WorldModel
    spec: ClassSpec
    embeddings: torch.Tensor  # float32, on the CPU
    imgsz: int


class OVDetector:
    """Open-vocabulary detector: `set_classes([...])`, then `detect(image)` → `sv.Detections`.

    `OVDetector("yolov8s-worldv2", device="cpu", conf=0.3)`: the keyword arguments are the fields of
    `ovdet.config.DetectorConfig` (model, text_model, device, half, imgsz, conf, iou, max_det, trust_weights, backend,
    precision, calib, threads, masks), which documents each one and its default. `OVDetector(config=cfg)` (or
    `OVDetector.from_config(cfg)`) builds one from a config; keyword arguments given beside it override its fields.
    """

    def __init__(self, model: str | Path | Any | None = None, *, config: DetectorConfig | None = None,
                 **overrides: Any):
        if model is not None:
            overrides["model"] = model
        cfg = (config if config is not None else DetectorConfig()).replace(**overrides)
        self._config = cfg
        # trust_weights=True allows checkpoints that run code when loaded: only for files you trust.
        self.world = WorldDetector.load(cfg.model, device=cfg.device, half=cfg.half, trust_weights=cfg.trust_weights,
                                        backend=cfg.backend, precision=cfg.precision, threads=cfg.threads,
                                        calib=cfg.calib, calib_imgsz=cfg.imgsz)
        self.imgsz = cfg.imgsz or self.world.train_imgsz  # default: the size the checkpoint was trained at
        self.conf, self.iou, self.max_det = cfg.conf, cfg.iou, cfg.max_det
        self._text = LazyTextEncoder(cfg.text_model, device=self.world.device_name,
                                     embedded_state=self.world.text_encoder_state)
        self._exemplars = ExemplarEncoder(self.world, lambda: self.imgsz, self._text.cache, cfg.text_model,
                                          embedded_tower=self.world.text_encoder_state is not None)
        self._spec: ClassSpec | None = None
        self._embeddings_source: str | None = None
        self._segmenters: dict[str, Segmenter] = {}  # by name: a SAM model is loaded once

    @classmethod
    def from_config(cls, config: DetectorConfig) -> OVDetector:
        """The detector `config` describes."""
        return cls(config=config)

    @classmethod
    def from_payload(cls, payload: DetectorPayload, config: DetectorConfig | None = None) -> OVDetector:
        """Rebuild a detector from another one's `worker_payload()`, running as `config` says (its model and imgsz
        come from the payload); its classes are set, with no text tower."""
        det = cls(config=(config or DetectorConfig()).replace(model=payload.model, imgsz=payload.imgsz))
        det.set_embeddings(payload.spec, payload.embeddings)
        return det

    @property
    def config(self) -> DetectorConfig:
        """The options this detector was built with (`conf`, `iou`, `max_det`, `imgsz` are also attributes of the
        detector itself, which may be changed later)."""
        return self._config

    def worker_payload(self) -> DetectorPayload:
        """This detector's weights (a CPU float32 copy when they are elsewhere), classes and image size, for
        `from_payload` in another process. ModelError before set_classes."""
        if self._spec is None:
            raise ModelError("No classes set: call set_classes(['person', ...]) before shipping the detector.")
        model = self.world.model
        embeddings = model.txt_feats[0].detach().float().cpu()
        first = next(model.parameters())
        if first.device.type != "cpu" or first.dtype != embeddings.dtype:
            model = copy.deepcopy(model).float().cpu()
        return DetectorPayload(model, self._spec, embeddings, int(self.imgsz))

    @property
    def device(self) -> torch.device:
        """The device it runs on (a torch.device: imports torch)."""
        return self.world.device

    @property
    def backend(self) -> str:
        """The backend that runs the forward pass: torch, openvino, onnxruntime or tensorrt."""
        return self.world.backend.name

    @property
    def precision(self) -> str:
        """The precision it runs at: fp32, bf16, fp16 or int8."""
        return self.world.backend.precision

    @property
    def model_id(self) -> str:
        """Identity of the detector weights (name@sha), e.g. to refuse resuming a job with another model."""
        return self.world.model_id

    @property
    def text_encoder(self) -> TextEncoder:
        """The text tower, loaded on first use: the one embedded in the checkpoint, or CLIP ViT-B/32."""
        return self._text.encoder

    @property
    def text_identity(self) -> str:
        """Cache identity of the text tower (name@sha of its source), known without loading it."""
        return self._text.identity

    @property
    def embeddings_source(self) -> str | None:
        """Where the current class embeddings came from: the text tower's identity (set_classes), or a digest of
        the embeddings given to set_embeddings. Lets a long job refuse to resume with another text model."""
        return self._embeddings_source

    @property
    def classes(self) -> list[str]:
        return [] if self._spec is None else self._spec.names

    @property
    def class_spec(self) -> ClassSpec | None:
        """The parsed classes: phrasings, per-class thresholds, negatives, templates."""
        return self._spec

    def set_classes(self, classes: str | Path | Sequence[str | Exemplar] | ClassSpec | Exemplar | None,
                    templates: bool | Sequence[str] | None = None, reduce: str | None = None,
                    exemplars: Sequence[Exemplar] = ()) -> None:
        """Set what to find; takes effect on the next detect call. `classes`: a list or comma string with inline
        syntax ("person|man" synonyms, "!reflection" negatives), a .yaml/.json class file, or a ClassSpec (see
        ovdet.text.prompts); `ovdet.Exemplar` items (or `exemplars`) show a class by an image and box instead of,
        or beside, words (see ovdet.text.exemplars). Cached prompt and exemplar embeddings are reused; the text
        tower is loaded only for new prompts, and the detector embeds only new exemplars."""
        spec = parse_classes(classes, templates=templates, reduce=reduce, exemplars=exemplars)
        embeddings = spec.embed(self._text.encode, self._exemplars.encode)
        self._use(spec, embeddings, source=self._text.identity)

    def set_embeddings(self, names: Sequence[str] | ClassSpec, embeddings: np.ndarray | torch.Tensor) -> None:
        """Use precomputed text embeddings (skips the text tower), numpy or torch: [C, D] for C class names, or for a
        ClassSpec one row per entry of `spec.columns` (each phrasing, negatives last)."""
        import torch

        if isinstance(names, ClassSpec):
            spec = parse_classes(names)  # checked like a parsed one
        else:
            spec = ClassSpec.from_names(parse_class_names(list(names)))
        rows = cpu_float32(embeddings)
        self._use(spec, rows, source=f"given@{state_digest({'embeddings': torch.from_numpy(rows)})}")

    def _use(self, spec: ClassSpec, embeddings: np.ndarray, source: str) -> None:
        if len(spec.columns) != len(embeddings):
            what = "class names" if spec.is_plain else "phrasings (ClassSpec.columns)"
            raise ClassSpecError(f"{len(spec.columns)} {what} but {len(embeddings)} embeddings: give one per "
                                 f"{'class' if spec.is_plain else 'phrasing'}.")
        columns = None if spec.is_plain else [c for _, c in spec.columns]
        self.world.set_text_embeddings(embeddings, columns=columns, reduce=spec.reduce)
        self._spec, self._embeddings_source = spec, source

    def detect(self, image: Any, conf: float | None = None, iou: float | None = None, max_det: int | None = None,
               imgsz: int | None = None, tile: int | TileSpec | None = None, overlap: float = 0.2,
               full_image: bool = True, merge: str = "nms", masks: Any = None) -> sv.Detections:
        """Detect the current classes in one image (path, BGR ndarray or PIL image). With `tile` (see detect_batch)
        the image is sliced into tiles; with `masks` (see detect_batch) every box gets an instance mask."""
        return self.detect_batch([image], conf=conf, iou=iou, max_det=max_det, imgsz=imgsz, tile=tile,
                                 overlap=overlap, full_image=full_image, merge=merge, masks=masks)[0]

    def detect_batch(self, images: Iterable[Any], conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, imgsz: int | None = None, tile: int | TileSpec | None = None,
                     overlap: float = 0.2, full_image: bool = True, merge: str = "nms", masks: Any = None,
                     mask_rle: bool = False) -> list[sv.Detections]:
        """Detect in several images with one forward pass; one `sv.Detections` per image, in order.

        `tile=640` slices each image into 640 px tiles overlapping by `overlap`, detects in batches of tiles (at
        `imgsz`), adds a pass over the whole image unless `full_image=False`, and merges the boxes ("nms" or
        "nmm"); a `ovdet.tiling.TileSpec` sets every tiling option. For small objects in large images.

        `masks` names a segmenter ("grabcut", "mobile_sam", "sam2.1_t", "sam2.1_b", "sam_b", see
        DetectorConfig.masks; None: the detector's own, False: none) that gives every box a bool mask in
        `Detections.mask` (N×H×W, image pixels; with tiling, computed in tile-sized windows around the boxes).
        `mask_rle=True` puts them in `Detections.data["mask_rle"]` as COCO RLEs instead, never dense: what a long job
        keeps in memory.
        """
        if self._spec is None:
            raise ModelError("No classes set: call set_classes(['person', ...]) before detecting.")
        segmenter = self._segmenter(masks)
        spec = tile_spec(tile, overlap=overlap, full_image=full_image, merge=merge)
        if spec is not None:
            def boxes(ims: list[np.ndarray]) -> list[sv.Detections]:
                return self.detect_batch(ims, conf=conf, iou=iou, max_det=max_det, imgsz=imgsz, masks=False)

            overview = imgsz or self.imgsz
            if segmenter is None:
                return detect_tiled(boxes, (tile_source(im, overview_size=overview) for im in images), spec,
                                    max_det=max_det or self.max_det)
            out = []
            for im in images:  # one image at a time: its masks come from its pixels, read again window by window
                source = tile_source(im, overview_size=overview)
                dets = detect_tiled(boxes, [source], spec, max_det=max_det or self.max_det)[0]
                if not hasattr(source, "image"):  # a strip reader, read to the end: open it again
                    source = tile_source(im, overview_size=overview)
                parts = segment_windows(segmenter, source, dets.xyxy, spec.size)
                out.append(_with_masks(dets, parts, source.height, source.width, mask_rle))
            return out
        arrays = [load_image(im) for im in images]
        if not arrays:
            return []
        conf = self.conf if conf is None else conf
        own = self._spec.thresholds
        class_conf = [conf if t is None else t for t in own] if any(t is not None for t in own) else None
        raw = self.world(arrays, imgsz=imgsz or self.imgsz, conf=conf, iou=self.iou if iou is None else iou,
                         max_det=max_det or self.max_det, class_conf=class_conf)
        results = [self._to_detections(r) for r in raw]
        if segmenter is not None:
            results = [_with_masks(d, segmenter.segment_parts(a, d.xyxy), *a.shape[:2], mask_rle)
                       for d, a in zip(results, arrays)]
        return results

    def _segmenter(self, masks: Any) -> Segmenter | None:
        """The segmenter `masks` asks for (None: the config's; False: none), made once per name."""
        masks = self._config.masks if masks is None else masks
        if masks is None or masks is False:
            return None
        if isinstance(masks, Segmenter):
            return masks
        key = str(masks)
        if key not in self._segmenters:
            self._segmenters[key] = create_segmenter(masks, device=self.world.device_name,
                                                     trust_weights=self._config.trust_weights)
        return self._segmenters[key]

    def stream(self, source: Any, track: bool = False, **kwargs: Any) -> Iterator[tuple[np.ndarray, sv.Detections]]:
        """Yield (frame, detections) for a video file, camera index, URL or iterable of frames."""
        from ovdet.media.stream import stream

        return stream(self, source, track=track, **kwargs)

    def _to_detections(self, arr: np.ndarray) -> sv.Detections:
        class_id = arr[:, 5].astype(int)
        return sv.Detections(
            xyxy=arr[:, :4].astype(np.float32),
            confidence=arr[:, 4].astype(np.float32),
            class_id=class_id,
            data={"class_name": np.array(self.classes, dtype=object)[class_id].astype(str)
                  if len(class_id) else np.array([], dtype=str)},
        )


def _with_masks(dets: sv.Detections, parts: Sequence[MaskPart], height: int, width: int,
                rle: bool) -> sv.Detections:
    """`dets` with one mask per box: dense bool in `.mask`, or (rle) COCO RLEs in `.data["mask_rle"]`."""
    if rle:
        encoded = np.empty(len(parts), dtype=object)
        for i, part in enumerate(parts):
            encoded[i] = encode_part(part, height, width)
        dets.data[MASK_RLE_KEY] = encoded
    else:
        dets.mask = paste(parts, height, width)
    return dets
