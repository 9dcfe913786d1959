"""The live-vocabulary graph: YOLO-World's forward with the class count taken from the text embeddings, exportable."""

from __future__ import annotations

import warnings
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.modules.block import C2fAttn, ImagePoolingAttn
from ultralytics.nn.modules.head import WorldDetect
from ultralytics.nn.tasks import WorldModel
from ultralytics.utils.tal import dist2bbox

from ovdet.backends.table import IMAGES, OUTPUT, TEXT  # tensor names of every exported graph


def _adaptive_max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """nn.AdaptiveMaxPool2d((k, k)) written with slices, so H×W stay dynamic in an exported graph.

    Bin i spans [floor(i·H/k), ceil((i+1)·H/k)) as in PyTorch's kernel, so the result is identical."""
    h, w = x.shape[2], x.shape[3]
    rows = []
    for i in range(k):
        band = x[:, :, (i * h) // k:((i + 1) * h + k - 1) // k]
        cells = [band[:, :, :, (j * w) // k:((j + 1) * w + k - 1) // k].amax((2, 3)) for j in range(k)]
        rows.append(torch.stack(cells, -1))
    return torch.stack(rows, -2)  # [B, C, k, k]


def _image_pooling_attn(m: ImagePoolingAttn, x: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    """ImagePoolingAttn.forward with the portable pooling (YOLO-World v1 updates the text embeddings with it)."""
    bs = x[0].shape[0]
    feats = [_adaptive_max_pool(proj(f), m.k).flatten(2) for f, proj in zip(x, m.projections)]
    feats = torch.cat(feats, dim=-1).transpose(1, 2)
    q = m.query(text).reshape(bs, -1, m.nh, m.hc)
    k = m.key(feats).reshape(bs, -1, m.nh, m.hc)
    v = m.value(feats).reshape(bs, -1, m.nh, m.hc)
    aw = torch.einsum("bnmc,bkmc->bmnk", q, k) / (m.hc ** 0.5)
    out = torch.einsum("bmnk,bkmc->bnmc", aw.softmax(-1), v)
    return m.proj(out.reshape(bs, -1, m.ec)) * m.scale + text


def _anchors(feats: list[torch.Tensor], strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres [2, A] and strides [1, A] from the feature-map shapes (ultralytics make_anchors, transposed)."""
    points, scale = [], []
    for i, f in enumerate(feats):
        h, w = f.shape[2], f.shape[3]
        sx = torch.arange(w, dtype=f.dtype, device=f.device) + 0.5
        sy = torch.arange(h, dtype=f.dtype, device=f.device) + 0.5
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        pts = torch.stack((gx, gy), 0).flatten(1)
        points.append(pts)
        scale.append(torch.ones_like(pts[:1]) * strides[i])
    return torch.cat(points, 1), torch.cat(scale, 1)


def live_head(m: WorldDetect, feats: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    """WorldDetect inference with box and class branches computed apart: [B, 4+K, A], K = text.shape[1].

    The stock head reshapes both branches together with `no = nc + 4·reg_max`, a constant once exported; here
    each branch is flattened on its own and only joined at the end, so K flows from the embeddings."""
    boxes = torch.cat([m.cv2[i](f).flatten(2) for i, f in enumerate(feats)], 2)  # [B, 4·reg_max, A]
    scores = torch.cat([m.cv4[i](m.cv3[i](f), text).flatten(2) for i, f in enumerate(feats)], 2)  # [B, K, A]
    anchors, strides = _anchors(feats, m.stride)
    dbox = dist2bbox(m.dfl(boxes), anchors.unsqueeze(0), xywh=True, dim=1) * strides
    return torch.cat((dbox, scores.sigmoid()), 1)


class LiveWorldGraph(nn.Module):
    """forward(images [B,3,H,W] RGB 0..1, txt_feats [B or 1, K, D]) → [B, 4+K, A]: xywh boxes in input pixels, then
    one sigmoid score per embedding row. Equals `WorldModel.predict(images, txt_feats=txt_feats)` for any B, H×W
    (multiples of the stride) and K, so one export serves every vocabulary."""

    def __init__(self, model: WorldModel):
        super().__init__()
        head = model.model[-1]
        if not isinstance(head, WorldDetect) or getattr(head, "end2end", False):
            raise TypeError(f"LiveWorldGraph needs a YOLO-World model with a WorldDetect head, got {type(head).__name__}")
        self.layers = model.model
        self.save = frozenset(model.save)

    def forward(self, images: torch.Tensor, txt_feats: torch.Tensor) -> torch.Tensor:
        text = txt_feats.to(images.dtype).expand(images.shape[0], -1, -1)
        guide = text  # the neck's guide; v1's ImagePoolingAttn refines it, the head scores against the original
        x, y = images, []
        for m in self.layers:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if isinstance(m, C2fAttn):
                x = m(x, guide)
            elif isinstance(m, WorldDetect):
                x = live_head(m, x, text)
            elif isinstance(m, ImagePoolingAttn):
                guide = _image_pooling_attn(m, x, guide)
            else:
                x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def export_onnx(model: WorldModel, path: str | Path, opset: int = 17) -> Path:
    """Write the live-vocabulary graph of `model` (fused, fp32, CPU copy) to an ONNX file and return its path.

    Inputs: `images` float32 [batch, 3, height, width] RGB in 0..1 (height and width multiples of the stride),
    `txt_feats` float32 [1 or batch, classes, embed] L2-normalized text embeddings. Output: `output` float32
    [batch, 4 + classes, anchors]: per anchor cx, cy, w, h in input pixels, then one sigmoid score per text row.
    Every one of these axes is dynamic."""
    path = Path(path)
    stride = max(int(model.stride.max()), 32)
    embed = int(model.txt_feats.shape[-1])
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():  # may be called in inference mode
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: every shape here is traced
        graph = LiveWorldGraph(_export_copy(model)).eval()
        example = (torch.rand(1, 3, 2 * stride, 3 * stride),
                   torch.nn.functional.normalize(torch.randn(1, 3, embed), dim=-1))
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                          input_names=[IMAGES, TEXT], output_names=[OUTPUT],
                          dynamic_axes={IMAGES: {0: "batch", 2: "height", 3: "width"},
                                        TEXT: {0: "text_batch", 1: "classes"},
                                        OUTPUT: {0: "batch", 1: "boxes_and_classes", 2: "anchors"}})
    return path


def _export_copy(model: WorldModel) -> WorldModel:
    """A fused fp32 CPU copy in contiguous memory: the device model stays as it is."""
    copy = deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    copy = copy.fuse(verbose=False).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy
