"""Exemplars on a detector: the region embedding of a box scores that box highest, exemplars from other images
find their class (also under a name the text tower cannot know), negatives remove boxes, the cache makes a warm
set_classes free, and OpenVINO / ONNX Runtime give the torch path's detections for exemplar classes."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest
import supervision as sv
import torch

from conftest import random_world_model, scene
from ovdet import Exemplar, OVDetector
from ovdet.errors import ModelError
from ovdet.jobs.evaluate import compute_map
from ovdet.jobs.synth import WorldSpec, image_rng, render
from ovdet.model import region
from ovdet.model.exemplar_encoder import ExemplarEncoder
from ovdet.text.cache import EmbeddingCache
from ovdet.model.world import WorldDetector
from ultralytics.nn.modules.block import ContrastiveHead
from ovdet.weights.registry import DEMO_FILE

demo_only = pytest.mark.skipif(not DEMO_FILE.is_file(), reason="the demo model is absent")
SEED = 2718  # a synth world the demo never saw (it trained on seed 0)
NAMES = WorldSpec().names


def _world(count: int, start: int = 0):
    """(image, boxes, class ids) of synth images start..start+count-1."""
    return [render(image_rng(SEED, "val", i), WorldSpec()) for i in range(start, start + count)]


def _first(world, class_name: str, skip: int = 0):
    """(image index, box) of the first objects of a class, after `skip` of them."""
    found = [(i, box) for i, (_, boxes, ids) in enumerate(world) for box, c in zip(boxes, ids) if NAMES[c] == class_name]
    return found[skip]


@pytest.fixture(scope="module")
def demo():
    if not DEMO_FILE.is_file():
        pytest.skip("the demo model is absent")
    return OVDetector("demo", device="cpu", backend="torch")


# ---------------------------------------------------------------- the region embedding itself

def _spread_model(cfg: str) -> torch.nn.Module:
    """A random model whose region features differ between anchors: random init collapses deep features to nearly
    one vector, so batch norm statistics are first measured on an image (one train-mode pass). The heads get unit
    scale and zero bias, and v2's contrastive batch norm a random affine part, so that normalising as the head does
    matters."""
    model = random_world_model(cfg, seed=3)
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model.predict(torch.from_numpy(scene(96, 96, seed=9)[:, :, ::-1].copy()).permute(2, 0, 1)[None] / 255.0)
    for contrastive in model.model[-1].cv4:
        contrastive.logit_scale.data.fill_(0.0)
        contrastive.bias.data.fill_(0.0)
        if hasattr(contrastive, "norm"):
            contrastive.norm.weight.data.uniform_(0.2, 3.0, generator=gen)
            contrastive.norm.bias.data.uniform_(-1.0, 1.0, generator=gen)
    return model.eval()


@pytest.fixture(scope="module", params=["yolov8n-world.yaml", "yolov8n-worldv2.yaml"], ids=["v1", "v2"])
def spread(request):
    return WorldDetector(_spread_model(request.param), request.param, device="cpu")


@pytest.mark.parametrize("shape, box, anchor", [
    ((96, 96), (57, 41, 63, 47), (5, 7)),  # no letterbox padding: the level-0 anchor at row 5, column 7
    ((70, 120), (62, 27, 68, 33), (3, 6)),  # scaled by 0.8 and padded 4 px top and bottom
])
def test_one_anchor_box_gets_the_best_score_a_class_embedding_can_give_it(spread, shape, box, anchor):
    """The exemplar of a box that holds one anchor centre is that anchor's region feature normalised as its head
    normalises it (v1: L2; v2: batch norm, then L2 by the unit class embedding), so that anchor's logit is the most
    any unit class embedding can give it: scale · |feature| + bias (nearly: the neck reads the classes too); and
    for v1, whose head compares unit vectors, no anchor scores higher."""
    world = spread
    image = scene(*shape, seed=4)
    vector = region.region_embeddings(world, [(image, box)], 96)
    assert vector.shape == (1, world.embed_dim) and torch.allclose(vector.norm(dim=1), torch.ones(1))
    world.set_text_embeddings(vector)
    head = world.model.model[-1].cv4[0]  # level 0 (stride 8), whose logits the hook reads before the sigmoid
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    try:
        with torch.inference_mode():
            world.backend.run(world.preprocess([image], 96), world._txt_feats)
    finally:
        hook.remove()
    feature, logits = seen[0][0][0], seen[0][1][0, 0]
    feature = feature / feature.norm(dim=0) if isinstance(head, ContrastiveHead) else head.norm(feature[None])[0]
    best = float(head.logit_scale.exp() * feature[:, anchor[0], anchor[1]].norm() + head.bias)
    assert float(logits[anchor]) == pytest.approx(best, rel=0.02)
    if isinstance(head, ContrastiveHead):
        assert divmod(int(logits.argmax()), logits.shape[1]) == anchor
        assert float(logits.median()) < float(head.logit_scale.exp() * 0.9 + head.bias)


def test_letterbox_box_inverts_scale_boxes():
    from ultralytics.utils import ops

    boxed = region.letterbox_box((10, 20, 50, 60), (70, 120, 3), (1, 3, 64, 96))
    back = ops.scale_boxes((64, 96), torch.tensor(boxed[None], dtype=torch.float32), (70, 120))
    assert torch.allclose(back, torch.tensor([[10.0, 20, 50, 60]]), atol=1e-4)


@demo_only
def test_each_objects_own_box_scores_that_object_highest(demo):
    """Every object of two images made an exemplar class of its own: the anchors predicting that object's box
    score as high for it as any anchor does (other objects of its shape and colour may tie at 1.0)."""
    for image, boxes, _ in _world(2):
        demo.set_classes([Exemplar(image, box=tuple(box), name=f"object {k}") for k, box in enumerate(boxes)])
        with torch.inference_mode():
            raw = demo.world.backend.run(demo.world.preprocess([image], 160), demo.world._txt_feats)[0]
        xyxy = torch.cat([raw[:2] - raw[2:4] / 2, raw[:2] + raw[2:4] / 2]).T.numpy()  # 160 px: no letterbox
        for k, box in enumerate(boxes):
            on_it = sv.box_iou_batch(xyxy, box[None])[:, 0] > 0.7
            scores = raw[4 + k].numpy()
            assert on_it.any() and scores[on_it].max() >= scores.max() - 1e-3 and scores.max() > 0.5


def _ap50(det, world, name_of):
    predictions, targets = [], []
    for dets, (_, boxes, ids) in zip(det.detect_batch([im for im, _, _ in world], conf=0.001), world):
        keep = np.array([name_of(c) for c in ids], bool)
        targets.append(sv.Detections(xyxy=boxes[keep].reshape(-1, 4), class_id=np.zeros(int(keep.sum()), int)))
        predictions.append(sv.Detections(xyxy=dets.xyxy, confidence=dets.confidence,
                                         class_id=np.zeros(len(dets), int)))
    return compute_map(predictions, targets, ["x"]).map50


@demo_only
def test_zorblax_exemplars_are_found_where_the_word_finds_nothing(demo):
    """Three blue circles from other images, under a name the text tower cannot know, find the blue circles."""
    refs, world = _world(8), _world(8, start=8)
    exemplars = []
    for k in range(3):
        i, box = _first(refs, "blue circle", skip=k)
        exemplars.append(Exemplar(refs[i][0], box=tuple(box), name="zorblax"))
    demo.set_classes(exemplars)
    assert demo.classes == ["zorblax"]
    assert _ap50(demo, world, lambda c: NAMES[c] == "blue circle") > 0.8
    demo.set_classes(["zorblax"])
    assert _ap50(demo, world, lambda c: NAMES[c] == "blue circle") < 0.2


@demo_only
def test_negative_exemplar_removes_the_boxes_it_shows(demo):
    (image, boxes, ids), = _world(1, start=3)
    demo.set_classes(["blue circle", "blue triangle", "red circle", "green square"])
    before = demo.detect(image, conf=0.25)
    victim = before.xyxy[0]
    demo.set_classes(["blue circle", "blue triangle", "red circle", "green square",
                      Exemplar(image, box=tuple(victim), negative=True)])
    after = demo.detect(image, conf=0.25)
    assert len(after) < len(before)
    assert not len(after) or sv.box_iou_batch(after.xyxy, victim[None]).max() < 0.5


# ---------------------------------------------------------------- cache

@demo_only
def test_cache_keys_box_content_and_size(demo, tmp_path, monkeypatch):
    calls = []
    real = region.region_embeddings
    monkeypatch.setattr(region, "region_embeddings", lambda w, items, s: calls.append(len(items)) or real(w, items, s))
    image, boxes, _ = _world(1)[0]
    path = tmp_path / "ref.png"
    cv2.imwrite(str(path), image)
    box = tuple(float(v) for v in boxes[0])
    size = [160]
    encoder = ExemplarEncoder(demo.world, lambda: size[0], EmbeddingCache(tmp_path / "cache"))
    first = encoder.encode([Exemplar(path, box=box, name="thing")])
    again = ExemplarEncoder(demo.world, lambda: size[0], EmbeddingCache(tmp_path / "cache"))  # as in a new process
    started = time.perf_counter()
    assert np.array_equal(again.encode([Exemplar(path, box=box, name="thing")]), first) and calls == [1]
    print(f"warm exemplar lookup: {(time.perf_counter() - started) * 1e3:.2f} ms")
    encoder.encode([Exemplar(path, box=(box[0] + 2, *box[1:]), name="thing")])  # another box
    assert calls == [1, 1]
    cv2.imwrite(str(path), 255 - image)  # same file name, other content
    assert not np.array_equal(encoder.encode([Exemplar(path, box=box, name="thing")]), first) and calls == [1, 1, 1]
    size[0] = 192  # embeddings are read at the inference size
    encoder.encode([Exemplar(path, box=box, name="thing")])
    assert calls == [1, 1, 1, 1]
    encoder.encode([Exemplar(path, box=box, name="other name", weight=2)])  # name and weight are not in the key
    assert calls == [1, 1, 1, 1]


@demo_only
def test_warm_set_classes_with_exemplars_runs_no_model(demo, monkeypatch):
    image, boxes, _ = _world(1)[0]
    exemplar = Exemplar(image, box=tuple(boxes[0]), name="thing")
    demo.set_classes(["red circle", exemplar])
    rows = demo.world._txt_feats.clone()
    monkeypatch.setattr(region, "region_embeddings", lambda *a: pytest.fail("computed again"))
    started = time.perf_counter()
    demo.set_classes(["red circle", exemplar])
    print(f"warm set_classes with an exemplar: {(time.perf_counter() - started) * 1e3:.2f} ms")
    assert torch.equal(demo.world._txt_feats, rows)


@demo_only
def test_clip_source_on_a_checkpoint_with_its_own_text_tower_says_what_to_do(demo):
    with pytest.raises(ModelError, match="text_model=.*source='region'"):
        demo.set_classes([Exemplar(scene(64, 64), name="thing", source="clip")])


@demo_only
def test_payload_and_set_embeddings_carry_exemplar_classes(demo):
    image, boxes, _ = _world(1)[0]
    demo.set_classes(["red circle", "!blue square", Exemplar(image, box=tuple(boxes[0]), name="thing")])
    want = demo.detect(image, conf=0.1)
    other = OVDetector.from_payload(demo.worker_payload())
    got = other.detect(image, conf=0.1)
    np.testing.assert_allclose(got.xyxy, want.xyxy, atol=1e-3)
    assert list(got.data["class_name"]) == list(want.data["class_name"])


# ---------------------------------------------------------------- backends

@demo_only
def test_exported_backends_detect_exemplar_classes_like_torch():
    refs, world = _world(4), _world(4, start=4)
    exemplars = [Exemplar(refs[i][0], box=tuple(box), name="zorblax") for i, box in
                 (_first(refs, "green triangle", skip=k) for k in range(2))]
    i, box = _first(refs, "red square")
    classes = ["red circle|red disc", "blue square", *exemplars, Exemplar(refs[i][0], box=tuple(box), negative=True),
               Exemplar(refs[i][0], box=tuple(box), name="blue square")]
    found = {}
    for name in ("torch", "openvino", "onnxruntime"):
        det = OVDetector("demo", device="cpu", backend=name)
        det.set_classes(classes)
        found[name] = det.detect_batch([im for im, _, _ in world], conf=0.2)
    assert sum(len(d) for d in found["torch"]) > 0
    for name in ("openvino", "onnxruntime"):
        for a, b in zip(found["torch"], found[name]):
            assert len(a) == len(b)
            np.testing.assert_array_equal(a.class_id, b.class_id)
            np.testing.assert_allclose(a.xyxy, b.xyxy, rtol=0, atol=1e-2)
            np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-4)
    assert not math.isnan(float(found["torch"][0].confidence.sum()))
