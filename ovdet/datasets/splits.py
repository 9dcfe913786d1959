"""Train/val split of an annotated dataset: a seeded hash of each image's path, so every re-run and resume agrees."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ovdet.errors import DatasetError

__all__ = ["ValSplit"]


@dataclass(frozen=True)
class ValSplit:
    """Hold out about `fraction` of the images for validation, chosen by a hash of (seed, image path).

    An image's split depends only on its own path (relative to the input folder) and the seed: never on
    which other images exist, their order, batching or where a run was interrupted.
    """

    fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise DatasetError(f"--val-split must be at least 0 and below 1 (a fraction of the images, e.g. 0.2), "
                               f"got {self.fraction:g}")

    @property
    def active(self) -> bool:
        return self.fraction > 0.0

    def is_val(self, image: str) -> bool:
        """Whether `image` (its path relative to the input folder, POSIX separators) is in the val split."""
        if not self.active:
            return False
        digest = hashlib.blake2b(f"{self.seed}\0{image}".encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.fraction * 2.0**64

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ValSplit":
        """The split a run's settings (run.json) name; runs from before splits existed have none."""
        return cls(float(settings.get("val_split", 0.0)), int(settings.get("split_seed", 0)))
