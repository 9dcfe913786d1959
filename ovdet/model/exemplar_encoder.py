"""Exemplar embeddings for one detector: its own region branch or CLIP's image tower, through the embedding cache.

Entries live in the same disk cache as prompt embeddings (ovdet.text.cache), under an identity that names the
source and what the embedding depends on: for "region" the detector's weights and inference size, for "clip" the
CLIP weights. Each entry's key is the exemplar's image sha256, box and source, so a warm `set_classes` hashes the
exemplar files (memoized by their times) and reads small files: no image is decoded, no model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovdet.errors import ModelError
from ovdet.text.cache import EmbeddingCache
from ovdet.text.exemplars import Exemplar, resolved_source

if TYPE_CHECKING:
    import torch

__all__ = ["ExemplarEncoder"]


class ExemplarEncoder:
    """[N, D] class embeddings of exemplars for the detector `world` (an ovdet WorldDetector) at the inference size
    `imgsz()`; "clip" exemplars use the CLIP image tower stored with the text model `text_model` (None: the
    default CLIP ViT-B/32), unless the detector's checkpoint embeds its own text tower (which has no image tower)."""

    def __init__(self, world: Any, imgsz: Callable[[], int], cache: EmbeddingCache,
                 text_model: Any = None, embedded_tower: bool = False):
        self.world = world
        self.imgsz = imgsz
        self.cache = cache
        self.text_model = text_model
        self.embedded_tower = embedded_tower
        self._vision: Any = None
        self._clip_identity: str | None = None

    def identity(self, source: str) -> str:
        """The cache identity of one source's embeddings for this detector, known without loading a model."""
        if source == "region":
            return f"exemplar-region@{int(self.imgsz())}/{self.world.model_id}"
        if self._clip_identity is None:
            resolved = self._clip_source()
            self._clip_identity = self.cache.source_identity(resolved) if isinstance(resolved, Path) \
                else self.vision.identity  # a Hugging Face id: its weights are known once loaded
        return f"exemplar-clip/{self._clip_identity}"

    def _clip_source(self) -> str | Path:
        from ovdet.weights.registry import resolve_text_model

        if self.embedded_tower and self.text_model is None:
            raise ModelError(f"source='clip' exemplars need CLIP's image tower, but {self.world.name} carries its "
                             "own text tower, which has none: pass text_model= (--text-model) naming CLIP weights "
                             "(the OpenAI ViT-B-32.pt or a Hugging Face CLIP folder), or use source='region' "
                             "(--exemplar-source region), which needs no other weights.")
        if self.text_model is not None and not isinstance(self.text_model, (str, Path)):
            raise ModelError("source='clip' exemplars load CLIP's image tower from the text model's files; this "
                             "detector was given a TextEncoder object: pass the CLIP file or folder as text_model, "
                             "or use source='region'.")
        return resolve_text_model(self.text_model)

    @property
    def vision(self) -> Any:
        """The CLIP image tower (ovdet.text.vision.ImageEncoder), loaded on first use."""
        if self._vision is None:
            from ovdet.text.vision import ImageEncoder

            self._vision = ImageEncoder.load(self._clip_source(), device=self.world.device)
        return self._vision

    def encode(self, exemplars: Sequence[Exemplar]) -> np.ndarray:
        """[N, D] float32 unit embeddings (numpy), cached ones read from disk, the others computed (with torch) and
        stored."""
        out = np.empty((len(exemplars), int(self.world.embed_dim)), dtype=np.float32)
        by_source: dict[str, list[int]] = {}
        for i, exemplar in enumerate(exemplars):
            by_source.setdefault(resolved_source(exemplar.source), []).append(i)
        for source, indexes in by_source.items():
            identity = self.identity(source)
            keys = [exemplars[i].key for i in indexes]
            found = self.cache.get(identity, keys)
            missing = [i for i, key in zip(indexes, keys) if key not in found]
            if missing:
                todo = list({exemplars[i].key: exemplars[i] for i in missing}.values())
                fresh = self._compute(source, todo)
                self.cache.put(identity, [e.key for e in todo], fresh.numpy())
                found.update(zip((e.key for e in todo), fresh.numpy()))
            for i, key in zip(indexes, keys):
                vector = found[key]
                if vector.shape != (out.shape[1],):
                    raise ModelError(f"The {source} embedding of {exemplars[i]!r} has {vector.shape[0]} values but "
                                     f"this detector's class embeddings have {out.shape[1]}: the CLIP weights do not "
                                     "match it; give the text model it was trained with.")
                out[i] = np.asarray(vector, dtype=np.float32)
        return out

    def _compute(self, source: str, exemplars: list[Exemplar]) -> torch.Tensor:
        if source == "region":
            from ovdet.model.region import region_embeddings

            return region_embeddings(self.world, [(e.pixels(), e.xyxy()) for e in exemplars], int(self.imgsz()))
        return self.vision.encode([e.crop() for e in exemplars]).float().cpu()
