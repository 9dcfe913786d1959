"""SAM-family segmenters: ovdet's masks equal ultralytics' `SAM(...)(image, bboxes=...)` on the same (random) weights.

No SAM checkpoint can be downloaded here, so each model is built by ultralytics' own builder from a fixed seed and
saved as a state dict under its published file name; the iou-score head's bias is raised so that ultralytics' score
filter (conf 0) keeps every mask to compare (ovdet keeps every box's mask whatever its score). Both run at imgsz 256
instead of 1024 to keep the test fast; the code path is the same.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile

import cv2
import numpy as np
import pytest
import torch

from ovdet.errors import UnknownModelError, WeightsCorruptError, WeightsNotFoundError, WeightsUnsafeError
from ovdet.masks import create_segmenter
from ovdet.masks.names import SAM_MODELS
from ovdet.masks.sam import _BUILDERS, SamSegmenter, build_sam_model
from ovdet.weights.registry import import_weights, list_models, lookup, weights_dir

SMALL = ("mobile_sam", "sam2.1_t")  # the smallest of each family (SAM's decoder, SAM 2's decoder)
IMGSZ = 256


@pytest.fixture(scope="module", params=SMALL)
def weights(request, tmp_path_factory):
    """(name, path) of a seeded random-weights checkpoint saved as ultralytics' file name."""
    name = request.param
    torch.manual_seed(0)
    model = build_sam_model(name)
    decoder = model.mask_decoder if hasattr(model, "mask_decoder") else model.sam_mask_decoder
    with torch.no_grad():
        decoder.iou_prediction_head.layers[-1].bias += 10.0
    path = tmp_path_factory.mktemp(name) / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return name, path


def _image() -> np.ndarray:
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.circle(img, (40, 50), 20, (0, 0, 255), -1)
    return img


BOXES = np.array([[20, 30, 60, 70], [70, 10, 120, 90], [0, 0, 128, 96], [5.5, 6.5, 30.2, 40.7]], np.float32)


def test_masks_equal_ultralytics_sam_on_the_same_weights(weights):
    from ultralytics import SAM

    name, path = weights
    seg = create_segmenter(str(path), device="cpu")
    seg = SamSegmenter(name, seg.model, device="cpu", imgsz=IMGSZ)
    ours = seg.segment(_image(), BOXES)
    result = SAM(str(path))(_image(), bboxes=BOXES, conf=0.0, imgsz=IMGSZ, device="cpu", verbose=False)[0]
    theirs = result.masks.data.cpu().numpy().astype(bool)
    assert result.boxes.cls.int().tolist() == [0, 1, 2, 3]  # every box kept: the comparison covers them all
    assert ours.shape == (4, 96, 128) and ours.dtype == bool
    for i in range(4):
        assert 0 < theirs[i].sum() < 96 * 128  # not trivially empty or full
        assert (ours[i] == theirs[i]).all(), f"{name}: box {i} differs in {(ours[i] != theirs[i]).sum()} pixels"


def test_the_encoder_runs_once_per_image_and_the_boxes_decode_in_one_call(weights):
    name, path = weights
    seg = SamSegmenter.load(name, path, device="cpu", imgsz=IMGSZ)
    model = seg.model
    encoder = model.image_encoder
    decoder = model.mask_decoder if hasattr(model, "mask_decoder") else model.sam_mask_decoder
    calls = {"encoder": 0, "decoder": 0}
    encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    decoder.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    many = np.concatenate([BOXES] * 5)
    masks = seg.segment(_image(), many)
    assert calls == {"encoder": 1, "decoder": 1}
    assert (masks[:4] == masks[4:8]).all()  # a box's mask does not depend on the boxes decoded beside it
    one = seg.segment(_image(), BOXES[1:2])
    assert (one[0] == masks[1]).all()


def test_degenerate_boxes_are_kept_with_empty_masks(weights):
    name, path = weights
    seg = SamSegmenter.load(name, path, device="cpu", imgsz=IMGSZ)
    with pytest.warns(Warning, match="no area inside"):
        masks = seg.segment(_image(), [[10, 10, 10, 40], *BOXES[:1], [500, 500, 600, 600]])
    assert not masks[0].any() and not masks[2].any() and masks[1].any()


def test_registry_names_resolve_imported_weights_and_missing_ones_say_how_to_fix(weights, monkeypatch):
    name, path = weights
    monkeypatch.setattr("ovdet.weights.registry._ultralytics_weights_dir", lambda: weights_dir() / "none")
    monkeypatch.chdir(path.parent.parent)  # no stray copy in the working folder
    with pytest.raises(WeightsNotFoundError, match=rf"{name}\.pt.*offline.*ovdet weights import"):
        create_segmenter(name, device="cpu")
    assert import_weights(path) == weights_dir() / f"{name}.pt"
    assert lookup(name).kind == "segmenter"
    assert {r.name: r.path for r in list_models()}[name] == weights_dir() / f"{name}.pt"
    seg = create_segmenter(name.upper(), device="cpu")
    assert isinstance(seg, SamSegmenter) and seg.name == name and seg.imgsz == 1024


def test_bad_sam_files_are_refused_before_anything_runs(tmp_path):
    detector_named_like_sam = tmp_path / "mobile_sam.pt"
    torch.save({"model": {"not": torch.zeros(1)}}, detector_named_like_sam)
    with pytest.raises(WeightsCorruptError, match="holds no SAM weights"):
        create_segmenter(detector_named_like_sam, device="cpu")
    shaped_wrong = tmp_path / "sam2.1_t.pt"
    torch.save({"image_encoder.x": torch.zeros(1), "sam_mask_decoder.y": torch.zeros(1)}, shaped_wrong)
    with pytest.raises(WeightsCorruptError, match="do not fit its architecture"):
        create_segmenter(shaped_wrong, device="cpu")

    class Boom:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    hostile = tmp_path / "sub" / "sam_b.pt"
    hostile.parent.mkdir()
    torch.save({"image_encoder.x": torch.zeros(1), "payload": Boom()}, hostile, pickle_protocol=2)
    assert zipfile.is_zipfile(hostile)
    with pytest.raises(WeightsUnsafeError, match="shutil.rmtree"):
        create_segmenter(hostile, device="cpu")
    assert (tmp_path / "victim").is_dir()  # nothing from the file ran
    with pytest.raises(WeightsCorruptError, match="does not exist"):
        create_segmenter(tmp_path / "sam2.1_b.pt", device="cpu")
    with pytest.raises(UnknownModelError):
        create_segmenter(tmp_path / "sam3.pt")
    assert pickle  # (the hostile object is pickled by torch.save above)


def test_every_sam_name_has_a_builder_and_a_registry_entry():
    assert set(_BUILDERS) == set(SAM_MODELS)
    for name in SAM_MODELS:
        spec = lookup(f"{name}.pt")
        assert spec.kind == "segmenter" and spec.filename == f"{name}.pt" and spec.url.endswith(f"/{name}.pt")


def test_sam2_1_models_get_the_2_1_options():
    model = build_sam_model("sam2.1_t")
    assert model.no_obj_embed_spatial is not None and model.proj_tpos_enc_in_obj_ptrs
