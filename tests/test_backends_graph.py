"""The live-vocabulary graph equals WorldModel.predict for any batch, image size and class count, in torch and
exported to ONNX (run by ONNX Runtime and OpenVINO)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_embeddings, random_world_model
from ovdet.backends.graph import LiveWorldGraph, _adaptive_max_pool, export_onnx

CASES = [(1, 160, 224, 7), (3, 96, 64, 80), (2, 128, 128, 1), (1, 64, 320, 300)]  # batch, height, width, classes


@pytest.fixture(scope="module", params=["yolov8n-worldv2.yaml", "yolov8n-world.yaml"], ids=["v2", "v1"])
def fused(request):
    return random_world_model(request.param, seed=3).fuse(verbose=False).eval()


@pytest.fixture(scope="module")
def onnx_file(fused, tmp_path_factory):
    return export_onnx(fused, tmp_path_factory.mktemp("graph") / "live.onnx")


def reference(model, images, txt):
    model.model[-1].nc = txt.shape[1]
    with torch.inference_mode():
        return model.predict(images, txt_feats=txt)[0]


def inputs(batch, height, width, classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen), random_embeddings(classes, seed=seed)[None]


@pytest.mark.parametrize("case", CASES, ids=[f"b{b}-{h}x{w}-k{k}" for b, h, w, k in CASES])
def test_graph_equals_predict_in_torch(fused, case):
    images, txt = inputs(*case)
    with torch.inference_mode():
        out = LiveWorldGraph(fused)(images, txt)
    ref = reference(fused, images, txt)
    assert out.shape == ref.shape == (case[0], 4 + case[3], ref.shape[2])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_portable_pooling_equals_adaptive_max_pool():
    for h, w in [(20, 20), (7, 11), (3, 5), (40, 13)]:
        x = torch.randn(2, 4, h, w)
        torch.testing.assert_close(_adaptive_max_pool(x, 3), torch.nn.AdaptiveMaxPool2d((3, 3))(x), rtol=0, atol=0)


def test_onnx_export_keeps_every_axis_dynamic(onnx_file):
    """Batch, height, width and the class count are symbolic in the file (OpenVINO / ONNX Runtime runs against torch
    are in test_backends.py)."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"images": ["batch", 3, "height", "width"], "txt_feats": ["text_batch", "classes", 512],
                    "output": ["batch", "boxes_and_classes", "anchors"]}
