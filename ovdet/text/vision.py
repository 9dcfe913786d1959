"""CLIP image tower on `transformers`: crops → L2-normalised image embeddings in CLIP's joint space (exemplars).

Loaded offline from the same files as the text tower (ovdet.text.tower): the OpenAI-format `.pt` (TorchScript or
state dict; its `visual.*` tensors converted to transformers' CLIPVisionModelWithProjection layout in memory), a
Hugging Face CLIP folder or id. Crops are preprocessed as CLIP (and open_clip) do: shortest side resized to the
tower's image size (bicubic), centre crop, RGB, scaled to [0, 1] and normalised with OpenAI's mean and std.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ovdet.errors import ModelError, WeightsCorruptError, WeightsNotFoundError
from ovdet.text.tower import _read_weights_file, map_resblocks
from ovdet.util.env import is_offline
from ovdet.util.hashing import state_digest

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageEncoder", "convert_openai_visual_state_dict", "preprocess"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's image normalisation (open_clip OPENAI_DATASET_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LAYER_KEY = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)")
_TOP_KEYS = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
             "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "visual.ln_post.weight": "vision_model.post_layernorm.weight",
             "visual.ln_post.bias": "vision_model.post_layernorm.bias"}


def _visual_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of an OpenAI-layout CLIP state dict (unwraps {"state_dict": ...} and "module.")."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsCorruptError(f"{source} holds a {type(obj).__name__}, not a CLIP state dict.")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(k, str)}
    sd = {k: v for k, v in sd.items() if k.startswith("visual.") and isinstance(v, torch.Tensor)}
    missing = [k for k in (*_TOP_KEYS, "visual.proj") if k not in sd]
    if missing:
        raise WeightsCorruptError(f"{source} has no CLIP image tower of OpenAI's ViT layout (missing "
                                  f"{', '.join(missing[:3])}): exemplars with source='clip' need the full CLIP model, "
                                  "e.g. the OpenAI ViT-B-32.pt or a Hugging Face CLIP folder; or use source='region'.")
    return sd


def convert_openai_visual_state_dict(sd: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
                                     ) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """OpenAI CLIP (ViT image tower) state dict → (CLIPVisionConfig, CLIPVisionModelWithProjection state dict),
    float32. Sizes come from tensor shapes; heads default to width // 64 (OpenAI's rule)."""
    from transformers import CLIPVisionConfig

    sd = _visual_state_dict(sd, "The state dict")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    if not layers or layers != list(range(len(layers))) or "visual.transformer.resblocks.0.mlp.c_fc.weight" not in sd:
        raise WeightsCorruptError(f"The CLIP image tower has an incomplete transformer (layers {layers}).")
    heads = num_attention_heads or max(1, width // 64)
    if width % heads:
        raise ModelError(f"num_attention_heads={heads} does not fit an image tower of width {width}.")
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=sd["visual.proj"].shape[1], num_hidden_layers=len(layers), num_attention_heads=heads,
        image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    out = {new: sd[old] for old, new in _TOP_KEYS.items()}
    out["visual_projection.weight"] = sd["visual.proj"].t()
    used = {*_TOP_KEYS, "visual.proj"}
    map_resblocks(sd, _LAYER_KEY, "vision_model.encoder.layers", out, used)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise WeightsCorruptError(f"The CLIP image tower has tensors ovdet cannot map to transformers' CLIP: "
                                  f"{', '.join(unknown[:5])}. Only OpenAI's ViT image towers are supported.")
    return config, {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def preprocess(crops: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """BGR uint8 crops → [N, 3, S, S] CLIP input: shortest side to S (bicubic, PIL), centre crop, RGB, [0, 1],
    normalised with OpenAI's mean and std (what open_clip's image_transform does at inference)."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    transform = Compose([Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size),
                         ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([transform(Image.fromarray(np.ascontiguousarray(c[:, :, ::-1]))) for c in crops])


class ImageEncoder:
    """CLIP image tower (`CLIPVisionModelWithProjection`, eval, float32): BGR crops → unit embeddings."""

    def __init__(self, model: CLIPVisionModelWithProjection, name: str, device: str | torch.device = "cpu"):
        self.model = model.to(device=torch.device(device), dtype=torch.float32).eval().requires_grad_(False)
        self.name = name
        self._identity: str | None = None

    @classmethod
    def load(cls, source: str | Path | None = None, device: str | torch.device = "cpu",
             num_attention_heads: int | None = None) -> ImageEncoder:
        """From the files the text tower loads (see ovdet.weights.registry.resolve_text_model; None: the default
        CLIP ViT-B/32): an OpenAI-format .pt, a Hugging Face CLIP folder or id."""
        from ovdet.weights.registry import resolve_text_model

        resolved = resolve_text_model(source)
        if isinstance(resolved, Path) and resolved.is_file():
            sd = _visual_state_dict(_read_weights_file(resolved), str(resolved))
            return cls.from_openai_state_dict(sd, name=resolved.stem, num_attention_heads=num_attention_heads,
                                              device=device)
        return cls(_from_pretrained(str(resolved)), Path(str(resolved)).name, device)

    @classmethod
    def from_openai_state_dict(cls, sd: Mapping[str, torch.Tensor], name: str = "openai-clip",
                               num_attention_heads: int | None = None,
                               device: str | torch.device = "cpu") -> ImageEncoder:
        """From an OpenAI-layout CLIP state dict (text tensors ignored), converted in memory."""
        from transformers import CLIPVisionModelWithProjection

        config, state = convert_openai_visual_state_dict(sd, num_attention_heads)
        model = CLIPVisionModelWithProjection(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsCorruptError(f"The CLIP image tower of {name!r} has inconsistent shapes: {exc}") from exc
        return cls(model, name, device)

    @property
    def identity(self) -> str:
        """`name@sha` over the weights: changes with any weight."""
        if self._identity is None:
            self._identity = f"{self.name}@{state_digest(self.model.state_dict())}"
        return self._identity

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    def encode(self, crops: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """[N, D] L2-normalised float32 embeddings of BGR uint8 crops, on `self.device`."""
        pixels = preprocess(crops, self.image_size)
        out = torch.empty(len(pixels), int(self.model.config.projection_dim), device=self.device)
        with torch.inference_mode():
            for start in range(0, len(pixels), batch_size):
                batch = pixels[start:start + batch_size].to(self.device)
                out[start:start + batch_size] = F.normalize(self.model(pixel_values=batch).image_embeds.float(),
                                                            dim=-1)
        return out


def _from_pretrained(source: str) -> CLIPVisionModelWithProjection:
    """`CLIPVisionModelWithProjection.from_pretrained` (a full CLIPModel folder too); refuses partial weights."""
    from transformers import CLIPVisionModelWithProjection

    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            source, local_files_only=is_offline(), dtype=torch.float32, output_loading_info=True)
    except OSError as exc:
        raise WeightsNotFoundError(f"Cannot load a CLIP image tower from {source}: {str(exc).rstrip('.')}. Give the "
                                   "OpenAI ViT-B-32.pt or a Hugging Face CLIP folder, or use source='region'.") from exc
    except Exception as exc:  # transformers/safetensors raise many types for broken files; keep the cause
        raise WeightsCorruptError(f"{source} holds a broken or non-CLIP model ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}).") from exc
    missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    if missing:
        raise WeightsCorruptError(f"{source} lacks CLIP image-tower weights ({len(missing)} missing or mis-shaped, "
                                  f"e.g. {missing[0]}): a text-only model, or an incomplete download. Exemplars with "
                                  "source='clip' need the full CLIP model; or use source='region'.")
    return model
