"""Region embeddings: the detector's own class-embedding branch read at a box, usable as a class embedding.

YOLO-World's head (ultralytics' WorldDetect) scores each anchor by comparing its region feature `cv3[i](x)` with
each class embedding in a contrastive head `cv4[i]`: v1's ContrastiveHead L2-normalises the region feature, v2's
BNContrastiveHead batch-normalises it; both L2-normalise the class embedding and scale the dot product by
exp(logit_scale) before adding a bias. The unit vector along the normalised region feature is therefore the class
embedding that scores that anchor highest, and it lives where text embeddings do. An exemplar's embedding is the
L2-normalised mean of those unit vectors over the anchors whose centres fall inside its box, on every level.

The neck's text-guided blocks (C2fAttn) gate the image features by their similarity to the class embeddings, so
the features depend on the classes fed in. The exemplar is read the way it will be detected: first with a neutral
(zero) class embedding, then twice more with the latest estimate as the only class (a fixed-point iteration: the
third reading agrees with what detecting with it computes to a cosine of about 0.99), and the last one is kept.
Runs on the torch model in fp32 at the detector's inference size with its letterbox, whatever backend detects.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.nn.modules.block import BNContrastiveHead
from ultralytics.nn.modules.head import WorldDetect

from ovdet.errors import ModelError

__all__ = ["letterbox_box", "region_embeddings", "region_feature_maps"]

PASSES = 3  # readings of the features: neutral classes first, then twice with the exemplar's latest estimate


def _fp32_model(world: Any) -> torch.nn.Module:
    """The detector's torch model in fp32 (a float copy when it runs in fp16)."""
    model = world.model
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    head = model.model[-1]
    if not isinstance(head, WorldDetect):
        raise ModelError(f"Region exemplars need a YOLO-World head (WorldDetect); {world.name} has a "
                         f"{type(head).__name__}. Use source='clip' for its exemplars instead.")
    return model


def letterbox_box(box: Sequence[float], image_shape: tuple[int, ...], batch_shape: tuple[int, ...]) -> np.ndarray:
    """A pixel box (x1, y1, x2, y2) of an image mapped into its letterboxed batch (ultralytics' LetterBox:
    each side scaled and rounded, padding split between the sides); the inverse of ops.scale_boxes."""
    h, w = image_shape[:2]
    height, width = batch_shape[-2:]
    gain = min(height / h, width / w)
    new_h, new_w = max(round(h * gain), 1), max(round(w * gain), 1)
    pad_x, pad_y = round((width - new_w) / 2 - 0.1), round((height - new_h) / 2 - 0.1)
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([x1 * new_w / w + pad_x, y1 * new_h / h + pad_y, x2 * new_w / w + pad_x, y2 * new_h / h + pad_y])


@torch.inference_mode()
def region_feature_maps(model: torch.nn.Module, batch: torch.Tensor, classes: torch.Tensor) -> list[torch.Tensor]:
    """Per level, the unit region features [B, D, h, w] that the head's contrastive branch compares with the
    class embeddings (`classes` [1 or B, K, D]) for this letterboxed fp32 batch."""
    head = model.model[-1]
    captured: list[list[torch.Tensor]] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(list(args[0])))  # copy: the head
    try:                                                                                         # rewrites the list
        nc = head.nc
        head.nc = int(classes.shape[1])
        model.predict(batch, txt_feats=classes.to(batch.device, batch.dtype))
    finally:
        hook.remove()
        head.nc = nc
    maps = []
    for level, x in enumerate(captured[0]):
        feature = head.cv3[level](x)
        contrastive = head.cv4[level]
        if isinstance(contrastive, BNContrastiveHead) and hasattr(contrastive, "norm"):
            feature = contrastive.norm(feature)  # v2: the head compares batch-normalised features
        maps.append(F.normalize(feature.float(), dim=1))
    return maps


def _inside(maps: list[torch.Tensor], index: int, batch_height: int, box: np.ndarray) -> torch.Tensor:
    """The unit features [N, D] of image `index`'s anchors whose centres fall inside `box` (letterboxed pixels),
    all levels; for a box too small to hold any centre, the finest level's anchor nearest the box centre."""
    picked = []
    for feature in maps:
        _, _, h, w = feature.shape
        stride = batch_height / h
        ys = (torch.arange(h, device=feature.device) + 0.5) * stride
        xs = (torch.arange(w, device=feature.device) + 0.5) * stride
        inside = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None, :]
        if bool(inside.any()):
            picked.append(feature[index][:, inside].T)
    if picked:
        return torch.cat(picked)
    finest = maps[0][index]
    stride = batch_height / finest.shape[1]
    row = min(max(int((box[1] + box[3]) / 2 / stride), 0), finest.shape[1] - 1)
    col = min(max(int((box[0] + box[2]) / 2 / stride), 0), finest.shape[2] - 1)
    return finest[:, row, col][None]


def region_embeddings(world: Any, items: Sequence[tuple[np.ndarray, Sequence[float]]], imgsz: int,
                      batch_size: int = 16) -> torch.Tensor:
    """[N, D] float32 CPU unit class embeddings, one per (BGR image, pixel box x1 y1 x2 y2) in `items`, read from
    `world`'s (an ovdet WorldDetector) region branch at inference size `imgsz` (see the module docstring).
    Images of one shape go through the model together, `batch_size` at a time, each with its own classes."""
    model = _fp32_model(world)
    device = next(model.parameters()).device
    dim = int(world.embed_dim)
    out = torch.empty(len(items), dim)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (image, _) in enumerate(items):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    chunks = [group[k:k + batch_size] for group in by_shape.values() for k in range(0, len(group), batch_size)]
    for chunk in chunks:
        batch = world.preprocess([np.ascontiguousarray(items[i][0]) for i in chunk], imgsz).to(device).float()
        boxes = [letterbox_box(items[i][1], items[i][0].shape, tuple(batch.shape)) for i in chunk]
        classes = torch.zeros(1, 1, dim, device=device)
        for _ in range(PASSES):
            maps = region_feature_maps(model, batch, classes)
            vectors = torch.stack([F.normalize(_inside(maps, k, batch.shape[2], box).mean(0), dim=0)
                                   for k, box in enumerate(boxes)])
            classes = vectors[:, None]  # each image's own estimate as its only class
        out[chunk] = vectors.cpu()
    return out
