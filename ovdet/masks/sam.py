"""ultralytics' SAM family as a segmenter: the image encoder once per image, every box of the image in one decoder call.

The models are built by ultralytics' own builders (`ultralytics.models.sam.build`: sam_b, mobile_sam, sam2.1_t,
sam2.1_b) and given weights that ovdet read itself: the file comes from the registry (ovdet.weights.registry) and is
unpickled with the same allowlist as detector weights (ovdet.weights.checkpoint), never with torch.load. The steps
are those of ultralytics' `SAM(...)(image, bboxes=...)` (letterbox to 1024 or `imgsz`, normalise, encode, prompt with the boxes,
decode one mask per box, scale to the image, threshold), minus its per-call predictor setup and `Results` objects,
and without its score filter: every box keeps its mask. Masks are scaled to the image a few boxes at a time, so a
large image never holds a float copy per box.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovdet.errors import ModelError, WeightsCorruptError
from ovdet.masks.base import MaskPart, Segmenter
from ovdet.util.device import select_device
from ovdet.weights.checkpoint import TRUST_HINT, load_checkpoint, sam_state_dict
from ovdet.weights.registry import check_checkpoint, resolve_segmenter

__all__ = ["SamSegmenter", "build_sam_model"]

IMGSZ = 1024  # the SAM models here were trained on 1024×1024 letterboxed images
_BUILDERS = {"sam_b": "build_sam_vit_b", "mobile_sam": "build_mobile_sam", "sam2.1_t": "build_sam2_t",
             "sam2.1_b": "build_sam2_b"}
_BUILD_LOCK = threading.Lock()  # building swaps the builders' checkpoint loader for a moment
_SCALE_BYTES = 256 << 20  # the float masks scaled to the image at once stay under this


def build_sam_model(name: str, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The `name` model from ultralytics' builder (sam2.1 variants with their 2.1 options), with `state` loaded
    (None: the builder's random initialisation). WeightsCorruptError when `state` does not fit the model."""
    from ultralytics.models.sam import build as sam_build

    builder = getattr(sam_build, _BUILDERS[name])

    def load(model: torch.nn.Module, checkpoint: str) -> torch.nn.Module:
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise WeightsCorruptError(f"The weights given for {name} do not fit its architecture: "
                                          f"{str(exc).splitlines()[0]}. Use the {name}.pt that ultralytics "
                                          "publishes.") from None
        return model

    # The builders read the checkpoint themselves (downloading it when missing, then torch.load); the file's name
    # also switches on the SAM 2.1 options. Their loader is swapped for one that takes the weights ovdet read.
    with _BUILD_LOCK:
        real = sam_build._load_checkpoint
        sam_build._load_checkpoint = load
        try:
            model = builder(f"{name}.pt")
        finally:
            sam_build._load_checkpoint = real
    return model.eval()


class SamSegmenter(Segmenter):
    """A SAM-family model (an ultralytics SAMModel or SAM2Model) prompted with boxes; see the module docstring.

    `imgsz` is the side of the square the image is letterboxed to (a multiple of 64; the models were trained at
    1024, as ultralytics runs them; smaller is faster and coarser)."""

    def __init__(self, name: str, model: torch.nn.Module, device: Any = "cpu", imgsz: int = IMGSZ):
        if imgsz < 64 or imgsz % 64:
            raise ModelError(f"SAM image size {imgsz} must be a multiple of 64 (the models were trained at 1024).")
        from ultralytics.models.sam.modules.sam import SAM2Model

        self.name = name
        self.device = select_device(device)
        self.model = model.to(self.device).float().eval()
        self.sam2 = isinstance(model, SAM2Model)
        self.imgsz = int(imgsz)
        self.model.set_imgsz((self.imgsz, self.imgsz))
        self.mean = torch.tensor([123.675, 116.28, 103.53], device=self.device).view(-1, 1, 1)
        self.std = torch.tensor([58.395, 57.12, 57.375], device=self.device).view(-1, 1, 1)

    @classmethod
    def load(cls, name: str, path: str | Path | None = None, device: Any = "auto", trust_weights: bool = False,
             imgsz: int = IMGSZ) -> SamSegmenter:
        """The `name` model with the weights of `path` (None: the registry's file, downloaded when online)."""
        if name not in _BUILDERS:
            raise ModelError(f"'{name}' is not a SAM model ovdet builds; use one of {', '.join(_BUILDERS)}.")
        if path is None:
            path = resolve_segmenter(name)
        else:
            path = Path(path)
            if not path.is_file():
                raise WeightsCorruptError(f"SAM weights file {path} does not exist. Check the path, or pass the "
                                          f"name {name} to use the registry's file (`ovdet weights path {name}`).")
            check_checkpoint(path)
        state = sam_state_dict(load_checkpoint(path, trust=trust_weights))
        if state is None:
            raise WeightsCorruptError(f"{path} holds no SAM weights (no image_encoder and mask decoder tensors). "
                                      f"Use the {name}.pt that ultralytics publishes. {TRUST_HINT}")
        return cls(name, build_sam_model(name, state), device=device, imgsz=imgsz)

    @torch.inference_mode()
    def _segment(self, image: np.ndarray, boxes: np.ndarray, rects: np.ndarray) -> list[MaskPart]:
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils import ops

        height, width = image.shape[:2]
        size = self.imgsz
        padded = LetterBox((size, size), auto=False, center=False)(image=image)
        im = torch.from_numpy(np.ascontiguousarray(padded[None, ..., ::-1].transpose(0, 3, 1, 2))).to(self.device)
        im = ((im - self.mean) / self.std).float()
        features = self._encode(im)
        gain = min(size / height, size / width)
        prompts = torch.as_tensor(boxes, dtype=torch.float32, device=self.device) * gain
        chunk = max(1, min(64, _SCALE_BYTES // (4 * height * width)))
        parts: list[MaskPart] = []
        for start in range(0, len(prompts), chunk):
            low = self._decode(features, prompts[start:start + chunk])  # [n, h, w] logits at 1/4 of imgsz
            ratio = [round(o * gain) * m / i / o for o, m, i in zip((height, width), low.shape[1:], im.shape[2:])]
            masks = ops.scale_masks(low[None].float(), (height, width), (ratio, (0, 0)), padding=False)[0]
            masks = (masks > self.model.mask_threshold).cpu().numpy()
            parts += [_crop(m) for m in masks]
        return parts

    def _encode(self, im: torch.Tensor) -> Any:
        """The image's features: SAM's embedding, or SAM 2's embedding and high-resolution maps (as ultralytics'
        SAM2Predictor.get_im_features computes them)."""
        if not self.sam2:
            return self.model.image_encoder(im)
        model = self.model
        _, vision_feats, _, _ = model._prepare_backbone_features(model.forward_image(im))
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        sizes = [[int(x / (16 * s)) for x in (self.imgsz, self.imgsz)] for s in (1 / 4, 1 / 2, 1)]
        feats = [f.permute(1, 2, 0).view(1, -1, *size) for f, size in zip(vision_feats, sizes)]
        return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}

    def _decode(self, features: Any, boxes: torch.Tensor) -> torch.Tensor:
        """One low-resolution mask logit map per box (in letterbox coordinates), single-mask output."""
        if not self.sam2:
            sparse, dense = self.model.prompt_encoder(points=None, boxes=boxes, masks=None)
            masks, _ = self.model.mask_decoder(image_embeddings=features,
                                               image_pe=self.model.prompt_encoder.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False)
            return masks.flatten(0, 1)
        corners = boxes.view(-1, 2, 2)  # a box is two points labelled 2 (top-left) and 3 (bottom-right)
        labels = torch.tensor([[2, 3]], dtype=torch.int32, device=boxes.device).expand(len(corners), -1)
        sparse, dense = self.model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        masks, _, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"][[-1]], image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=len(corners) > 1, high_res_features=[f[-1].unsqueeze(0) for f in features["high_res_feats"]])
        return masks.flatten(0, 1)


def _crop(mask: np.ndarray) -> MaskPart:
    """The part of a full-image bool mask that holds its pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return MaskPart.empty()
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return MaskPart(int(x0), int(y0), mask[y0:y1, x0:x1].copy())
