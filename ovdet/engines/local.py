"""The local engine: decode a folder's images in background threads, detect in batches in this process.

Memory stays flat however large the folder is: the folder is walked twice (once to count, once to work) instead of
listed, at most two batches (eight images, for small batches) are decoded ahead of the detector, and every batch is
written through the RunWriter before the next one is detected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import supervision as sv

from ovdet.config import DetectorConfig
from ovdet.engines.base import Counts, Detector, Runtime, Work, detector_runtime
from ovdet.engines.source import Source
from ovdet.errors import DatasetError
from ovdet.media.sources import LoadedImage, iter_image_files, prefetch_images
from ovdet.runs.folder import error_record
from ovdet.runs.journal import ImageRecord
from ovdet.runs.writer import RunWriter
from ovdet.util.display import shown
from ovdet.util.progress import progress

__all__ = ["LocalEngine"]


@dataclass(frozen=True)
class LocalEngine:
    """annotate with threads in this process (`engine="local"`, the default): a folder in, the job's detector."""

    def source(self, src: str | os.PathLike[str], recursive: bool = True) -> Source:
        """The folder `src` as given (its images' paths are recorded absolute); a URI is a DatasetError."""
        if "://" in os.fspath(src):
            raise DatasetError(f"{shown(src)}: the local engine reads folders; a URI source needs engine='ray' "
                               "(--engine ray)")
        folder = Path(src)
        return Source(str(folder.resolve()), os.fspath(src), folder, recursive)

    def driver_config(self, config: DetectorConfig) -> DetectorConfig:
        """The job's detector is the one that detects: built as asked."""
        return config

    def runtime(self, detector: Detector, config: DetectorConfig) -> Runtime:
        """What the detector reports it runs on."""
        return detector_runtime(detector)

    def run(self, work: Work, writer: RunWriter) -> Counts:
        """Detect in every image of the folder that `work.done` lacks, in folder order; returns (found, already)."""
        src = work.source.folder
        if src is None:
            raise DatasetError(f"{shown(work.source.uri)}: the local engine reads folders; a URI source needs "
                               "engine='ray' (--engine ray)")
        recursive = work.source.recursive
        found = already = 0
        for f in iter_image_files(src, recursive=recursive):
            found += 1
            already += f.relative_to(src).as_posix() in work.done
        pending = (f for f in iter_image_files(src, recursive=recursive)
                   if f.relative_to(src).as_posix() not in work.done)
        detect, kwargs = work.detector.detect_batch, work.detect_kwargs
        chunk: list[LoadedImage] = []
        with progress(total=found, initial=already, unit="img", desc="annotate", quiet=work.quiet) as bar:
            # tiled images are large and their tiles batch by themselves: decode only two batches of images ahead
            ahead = 2 * work.batch if kwargs.get("tile") is not None else max(2 * work.batch, 8)
            for item in prefetch_images(pending, workers=work.decode_threads, ahead=ahead):
                if item.error is not None:
                    path = Path(item.source)
                    writer.add_error(error_record(path.relative_to(src).as_posix(), os.path.abspath(path),
                                                  item.error, path))
                    bar.update(1)
                    continue
                chunk.append(item)
                if len(chunk) == work.batch:
                    _write(writer, chunk, detect([c.image for c in chunk], **kwargs), src)
                    bar.update(len(chunk))
                    chunk = []
                    writer.maybe_checkpoint()
            if chunk:
                _write(writer, chunk, detect([c.image for c in chunk], **kwargs), src)
                bar.update(len(chunk))
        return Counts(found, already)


def _write(writer: RunWriter, chunk: list[LoadedImage], results: Sequence[sv.Detections], src: Path) -> None:
    """Write every output of each image of a detected batch, in order."""
    if len(results) != len(chunk):
        raise RuntimeError(f"the detector returned {len(results)} results for {len(chunk)} images")
    for item, dets in zip(chunk, results):
        path = Path(item.source)
        rel = path.relative_to(src).as_posix()
        assert item.image is not None  # items with an error went to errors.jsonl
        rec = ImageRecord.from_detections(rel, os.path.abspath(path), writer.key_for(rel), item.image.shape, dets)
        writer.write(rec, item.image)
