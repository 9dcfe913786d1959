"""The Ray Data worker: one detector per actor, built once from the shipped payload and the spec's DetectorConfig.

Each call gets a batch of (image, key) rows, reads and decodes them in threads (ovdet.media.sources rules),
detects in sub-batches of the detector batch size, writes previews (and, for object-store sources, a
copy of each image under OUT/originals) and records the results in one part file, whose name it returns.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ovdet.engines.ray.parts import PARTS, RUN_TOKEN, write_part
from ovdet.config import DetectorConfig
from ovdet.engines.ray.storage import SourceReader
from ovdet.engines.source import Source
from ovdet.errors import EngineError, ImageError
from ovdet.runs.folder import ORIGINALS, error_record  # OUT/originals: copies of object-store images
from ovdet.util.safeio import atomic_write, ensure_dir
from ovdet.datasets.previews import PreviewWriter
from ovdet.runs.journal import ImageRecord

__all__ = ["Annotator", "WorkerSpec"]


@dataclass
class WorkerSpec:
    """Constructor arguments of an Annotator. `payload` is [ObjectRef of an ovdet.detector.DetectorPayload], put
    once; `config` says how the worker runs it (RayEngine.worker_config: device, backend, precision, threads)."""

    payload: list[Any]
    out: str
    token: str
    source: Source
    detect_kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    config: DetectorConfig = field(default_factory=DetectorConfig)
    save_annotated: bool = False


class Annotator:
    """Callable class for `Dataset.map_batches`: {"image", "key"} rows in, {"part", "images"} rows out."""

    def __init__(self, spec: WorkerSpec):
        import ray
        import torch

        from ovdet.detector import DetectorPayload, OVDetector

        _check_token(Path(spec.out), spec.token)
        torch.set_num_threads(max(1, spec.config.threads or 1))
        payload: DetectorPayload = ray.get(spec.payload[0])
        self.detector = OVDetector.from_payload(payload, spec.config)
        self.names = list(payload.spec.names)
        self.spec = spec
        self.out = Path(spec.out)
        self.reader = SourceReader(spec.source)
        self.preview = PreviewWriter(self.out / "annotated", self.names) if spec.save_annotated else None
        self.pool = ThreadPoolExecutor(max(2, spec.config.threads or 1), thread_name_prefix="ovdet-decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rels, keys = [str(r) for r in batch["image"]], [str(k) for k in batch["key"]]
        loads = [self.pool.submit(self._load, rel) for rel in rels]  # decoding overlaps the detection below
        lines: list[dict[str, Any]] = []
        chunk: list[tuple[str, str, np.ndarray]] = []
        for rel, key, load in zip(rels, keys, loads):
            image, error = load.result()
            if error is not None:
                lines.append({"error": error_record(rel, self.spec.source.location(rel), error)})
                continue
            chunk.append((rel, key, image))
            if len(chunk) == self.spec.batch:
                lines += self._detect(chunk)
                chunk = []
        if chunk:
            lines += self._detect(chunk)
        return {"part": [write_part(self.out, self.spec.token, keys, lines)], "images": [len(rels)]}

    def _load(self, rel: str) -> tuple[np.ndarray | None, ImageError | None]:
        try:
            image, data = self.reader.read(rel)
        except ImageError as exc:
            return None, exc
        if data is not None:
            copy = self.out / ORIGINALS / rel
            ensure_dir(copy.parent, self.out)  # a link planted anywhere below OUT is refused, not followed
            atomic_write(copy, data, root=self.out)
        return image, None

    def _path(self, rel: str) -> str:
        """The path predictions.jsonl and the YOLO / VOC links use: the file, or its copy under OUT/originals."""
        if self.spec.source.local:
            return self.spec.source.location(rel)
        return os.path.abspath(self.out / ORIGINALS / rel)

    def _detect(self, chunk: list[tuple[str, str, np.ndarray]]) -> list[dict[str, Any]]:
        results = self.detector.detect_batch([im for _, _, im in chunk], **self.spec.detect_kwargs)
        lines = []
        for (rel, key, image), dets in zip(chunk, results):
            rec = ImageRecord.from_detections(rel, self._path(rel), key, image.shape, dets)
            if self.preview is not None:
                self.preview.write(rec, image)
            lines.append({"ok": rec.to_json(self.names)})
        return lines


def _check_token(out: Path, token: str) -> None:
    """Refuse to run where the driver's output folder is not visible: the parts would be lost."""
    try:
        seen = (out / PARTS / RUN_TOKEN).read_text(encoding="utf-8").strip()
    except OSError:
        seen = None
    if seen != token:
        raise EngineError(
            f"the output folder {out} is not the driver's output folder on the worker host {socket.gethostname()}: "
            "Ray workers write their results into it, so --out must be a folder every node mounts at the same path "
            "(NFS, EFS, Lustre, ...) or the cluster must be this one machine"
        )
