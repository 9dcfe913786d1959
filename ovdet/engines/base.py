"""The `Engine` protocol: what a job hands an engine (`Work`, a `RunWriter`) and what it gets back (`Counts`).

A job (ovdet.jobs.annotate) checks its folders, builds the detector the engine asks for (`driver_config`), sets its
classes, opens a RunWriter and calls `engine.run(work, writer)`. The engine lists the source, detects in batches
(in this process: ovdet.engines.local; on a Ray cluster: ovdet.engines.ray) and writes every image through the
writer; it never reaches back into the job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import supervision as sv

from ovdet.config import DetectorConfig
from ovdet.engines.source import Source
from ovdet.runs.writer import RunWriter
from ovdet.text.prompts import ClassSpec

__all__ = ["Counts", "Detector", "Engine", "HasClassSpec", "ReportsRuntime", "Runtime", "Work", "detector_runtime"]


@runtime_checkable
class Detector(Protocol):
    """What a job and an engine use of a detector: an OVDetector, or any object with these members (test doubles)."""

    @property
    def model_id(self) -> str:
        """Identity of the weights (name@sha): a resume with other weights is refused."""

    @property
    def embeddings_source(self) -> str | None:
        """Identity of where the class embeddings came from (the text tower)."""

    @property
    def imgsz(self) -> int:
        """The inference size it runs at by default."""

    def set_classes(self, classes: ClassSpec) -> None:
        """Set what to find."""

    def detect_batch(self, images: Sequence[np.ndarray], conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, imgsz: int | None = None) -> list[sv.Detections]:
        """One sv.Detections per image, in order (OVDetector also takes `tile`)."""


@runtime_checkable
class HasClassSpec(Protocol):
    """A detector that says which classes it is set to (OVDetector): a job then skips setting the same ones again."""

    @property
    def class_spec(self) -> ClassSpec | None:
        """The classes set, or None."""


@runtime_checkable
class ReportsRuntime(Protocol):
    """A detector that says what runs its model (OVDetector), for the summary line and run.json."""

    @property
    def backend(self) -> str:
        """torch, openvino, onnxruntime or tensorrt."""

    @property
    def precision(self) -> str:
        """fp32, bf16, fp16 or int8."""


@dataclass(frozen=True)
class Runtime:
    """What runs the model of a run, as far as the engine knows: backend and precision (None: not known), and
    where (" on the workers" when that is not this process)."""

    backend: str | None
    precision: str | None
    where: str = ""

    def words(self) -> str | None:
        """"openvino fp32" for the summary line; None when the backend is not known."""
        if self.backend is None:
            return None
        return f"{self.backend} {self.precision or 'default precision'}{self.where}"

    @property
    def reduced_precision(self) -> str | None:
        """bf16 / int8 when the detections come from a reduced-precision model (they differ a little from fp32, so a
        resume must not mix them); None for fp32 and fp16, whose detections agree with fp32 to ~1e-4."""
        return self.precision if self.precision in ("bf16", "int8") else None


@dataclass
class Work:
    """What a job hands an engine besides the writer.

    `source`: the images; `done`: those the run's journal already holds (relative paths; an engine adds the ones
    it merges late); `detector`: the job's detector, classes set; `config`: the detector options the job was asked
    for (an engine whose workers build their own detectors builds them from it); `detect_kwargs`: passed to every
    detect_batch call (conf, iou, max_det, imgsz, tile); `batch`: images per detect_batch call; `decode_threads`:
    image-decoding threads of the local engine (None: its default).
    """

    source: Source
    done: set[str]
    detector: Detector
    config: DetectorConfig
    detect_kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    quiet: bool = False
    decode_threads: int | None = None


class Counts(NamedTuple):
    """What an engine's run found: images in the source, and how many of them the journal held before."""

    found: int
    already: int


@runtime_checkable
class Engine(Protocol):
    """Runs a detector over a job's images and writes every result through the job's RunWriter."""

    def source(self, src: str | os.PathLike[str], recursive: bool = True) -> Source:
        """Where the images are (DatasetError for a source this engine cannot read)."""

    def driver_config(self, config: DetectorConfig) -> DetectorConfig:
        """The options of the detector the job builds in its own process from the job's `config`."""

    def runtime(self, detector: Detector, config: DetectorConfig) -> Runtime:
        """What runs the model in this engine, given the job's detector and config."""

    def run(self, work: Work, writer: RunWriter) -> Counts:
        """Detect in every image `work.done` lacks and write the results through `writer`."""


def detector_runtime(detector: Detector, where: str = "") -> Runtime:
    """The backend and precision the detector reports, or an unknown Runtime for one that reports none."""
    if isinstance(detector, ReportsRuntime) and isinstance(detector.backend, str) \
            and isinstance(detector.precision, str):
        return Runtime(detector.backend, detector.precision, where)
    return Runtime(None, None, where)
