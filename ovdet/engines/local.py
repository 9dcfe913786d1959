"""The local engine: a three-stage pipeline in this process — decode ahead, detect, write behind.

Decoding threads read the next images while the detector runs, and one writer thread writes the previous batch
through the RunWriter (dataset files, previews, the journal line last) while the detector runs the next one. The
writer thread alone touches the RunWriter, in the order the images were detected, so the journal stays in folder
order and exactly-once holds: a batch is done when its journal lines are; one still waiting when the process is
killed is simply detected again on resume.

Thread budget (explicit, so the stages never oversubscribe the cores): the detector's own threads (its
`threads` option; the backend's default is every core), `Work.decode_threads` decoders (default min(4, cores);
they spend most of their time in libjpeg/libpng with the GIL released) and one writer thread (mostly file I/O and
JSON). Memory stays flat however large the folder is: the folder is walked twice (once to count, once to work)
instead of listed, at most two batches (eight images, for small batches) are decoded ahead of the detector and at
most two detected batches wait for the writer.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
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
    """annotate with threads in this process (`engine="local"`, the default): a folder in, the job's detector.

    `write_behind`: write each batch on a writer thread while the next one is detected (False: in turn, in this
    thread; the outputs are the same)."""

    write_behind: bool = True

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

            def error(item: LoadedImage) -> None:
                path = Path(item.source)
                writer.add_error(error_record(path.relative_to(src).as_posix(), os.path.abspath(path), item.error,
                                              path))
                bar.update(1)

            def batch(items: list[LoadedImage], results: Sequence[sv.Detections]) -> None:
                _write(writer, items, results, src)
                bar.update(len(items))
                writer.maybe_checkpoint()

            behind = _Behind() if self.write_behind else None
            later: Callable[[Callable[[], None]], None] = behind.submit if behind is not None else _now
            try:
                # tiled images are large and their tiles batch by themselves: decode only two batches of images ahead
                ahead = 2 * work.batch if kwargs.get("tile") is not None else max(2 * work.batch, 8)
                for item in prefetch_images(pending, workers=work.decode_threads, ahead=ahead):
                    if item.error is not None:
                        later(lambda item=item: error(item))
                        continue
                    chunk.append(item)
                    if len(chunk) == work.batch:
                        results = detect([c.image for c in chunk], **kwargs)
                        later(lambda c=chunk, r=results: batch(c, r))
                        chunk = []
                if chunk:
                    results = detect([c.image for c in chunk], **kwargs)
                    later(lambda c=chunk, r=results: batch(c, r))
            except BaseException:
                if behind is not None:
                    behind.close(reraise=False)  # what was detected is written; the first error is the one raised
                raise
            if behind is not None:
                behind.close()
        return Counts(found, already)


def _now(job: Callable[[], None]) -> None:
    job()


class _Behind:
    """One writer thread: runs the submitted jobs in order, at most `depth` waiting (submit blocks beyond that).

    After a job fails the thread skips the rest (so submit never blocks for good) and the error is raised in the
    submitting thread at its next submit or at close."""

    def __init__(self, depth: int = 2):
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ovdet-write", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the submitting thread: raised at its next submit / close
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self.jobs.put(job)
        self._raise()

    def close(self, reraise: bool = True) -> None:
        """Wait until every job submitted has run (or been skipped after a failure); raise the failure."""
        self.jobs.put(None)
        self.thread.join()
        if reraise:
            self._raise()


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
