"""CLIP image tower (exemplar source "clip"): equality with open_clip's encode_image and preprocessing on the same
random weights, loading from the text tower's files (OpenAI state dict, TorchScript, Hugging Face folder), errors,
and exemplars embedded with it through a detector."""

from __future__ import annotations

import warnings

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from conftest import scene
from ovdet.errors import WeightsCorruptError
from ovdet.text.vision import ImageEncoder, preprocess

SIZE, HEADS = 32, 2


@pytest.fixture(scope="module")
def reference():
    """open_clip's CLIP (quick_gelu, tiny towers) with seeded random weights; 1-d params perturbed so that layer-norm
    and bias mappings matter."""
    torch.manual_seed(1)
    model = CLIP(embed_dim=512, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=64 // HEADS, patch_size=16,
                                                         image_size=SIZE),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
                 quick_gelu=True).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
        model.visual.class_embedding.add_(torch.randn_like(model.visual.class_embedding))
    return model


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """The reference weights as a plain state dict .pt and as a TorchScript archive (OpenAI's ViT-B-32.pt format)."""
    folder = tmp_path_factory.mktemp("clip")
    sd_path, jit_path = folder / "tiny-sd.pt", folder / "tiny-jit.pt"
    torch.save(reference.state_dict(), sd_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(reference, {"encode_image": (torch.randn(1, 3, SIZE, SIZE),)},
                                        check_trace=False)
        torch.jit.save(traced, str(jit_path))
    return {"sd": sd_path, "jit": jit_path}


def _crops() -> list[np.ndarray]:
    """Square, wide, tall and tiny crops (the tiny one upscaled)."""
    return [scene(40, 40, seed=1), scene(30, 70, seed=2), scene(90, 24, seed=3), scene(60, 60, seed=4)[20:27, 30:39]]


def test_preprocessing_equals_open_clip():
    transform = open_clip.image_transform(SIZE, is_train=False)
    for crop in _crops():
        want = transform(Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1])))
        assert torch.allclose(preprocess([crop], SIZE)[0], want, atol=1e-6)


@pytest.mark.parametrize("kind", ["dict", "sd", "jit"])
def test_image_tower_equals_open_clip_encode_image(reference, files, kind):
    if kind == "dict":
        encoder = ImageEncoder.from_openai_state_dict(reference.state_dict(), num_attention_heads=HEADS)
    else:
        encoder = ImageEncoder.load(files[kind], num_attention_heads=HEADS)
    crops = _crops()
    with torch.no_grad():
        want = reference.encode_image(preprocess(crops, SIZE), normalize=True)
    got = encoder.encode(crops)
    assert got.shape == (4, 512) and torch.allclose(got, want, atol=1e-5)
    assert encoder.image_size == SIZE


def test_heads_matter(reference):
    """A wrong head count gives other embeddings: the equality above is not an accident of the weights."""
    crops = _crops()
    with torch.no_grad():
        want = reference.encode_image(preprocess(crops, SIZE), normalize=True)
    wrong = ImageEncoder.from_openai_state_dict(reference.state_dict(), num_attention_heads=1).encode(crops)
    assert not torch.allclose(wrong, want, atol=1e-3)


def test_hugging_face_folder(tmp_path):
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": SIZE, "patch_size": 16},
                        projection_dim=512)
    torch.manual_seed(0)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "hf")
    encoder = ImageEncoder.load(tmp_path / "hf")
    pixels = preprocess(_crops(), SIZE)
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=pixels).pooler_output
        want = torch.nn.functional.normalize(full.visual_projection(pooled), dim=-1)
    assert torch.allclose(encoder.encode(_crops()), want, atol=1e-5)


def test_text_only_weights_say_what_to_do(reference, tmp_path):
    path = tmp_path / "text-only.pt"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")}, path)
    with pytest.raises(WeightsCorruptError, match="no CLIP image tower.*source='region'"):
        ImageEncoder.load(path)


def test_clip_exemplars_through_a_detector(files, tmp_path):
    from ovdet import Exemplar, OVDetector

    det = OVDetector("yolov8n-worldv2.yaml", text_model=files["sd"], device="cpu")
    image = scene(120, 160, seed=5)
    box = (10, 20, 70, 90)
    det.set_classes(["red square", Exemplar(image, box=box, name="thing", source="clip")])
    want = ImageEncoder.load(files["sd"]).encode([image[20:90, 10:70]])[0]
    assert det.class_spec.classes[1].exemplars[0].source == "clip"
    assert torch.allclose(det.world._txt_feats[0, 1].float(), want, atol=1e-5)
    region = Exemplar(image, box=box, name="thing")  # the default source reads the detector instead
    det.set_classes(["red square", region])
    assert not torch.allclose(det.world._txt_feats[0, 1].float(), want, atol=1e-2)
