"""`annotate_folder`: pseudo-label a folder of images into COCO / YOLO / VOC / JSONL datasets, resumably.

Images are decoded in background threads (ovdet.media.sources.prefetch_images) while the detector runs on
batches. Every finished image is appended to `predictions.jsonl` (the journal) after its per-image
files (YOLO txt, VOC xml, preview) are in place; the COCO file is rebuilt from the journal at
checkpoints and at the end. A run killed at any moment and started again with the same arguments
skips what the journal holds and does the rest, so every image ends up exactly once in every output.

Output folder layout::

    run.json            settings of the run (a resume must match them)
    predictions.jsonl   one line per image: every detection with class name, score and xyxy box
    errors.jsonl        one line per file that could not be read: path and reason
    coco/annotations.json
    yolo/data.yaml, yolo/images/ (links to the originals), yolo/labels/
    voc/Annotations/, voc/JPEGImages/ (links to the originals)
    annotated/          preview JPEGs (with save_annotated)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovdet.util.display import shown
from ovdet.errors import DatasetError, OVDetWarning, ResumeMismatchError
from ovdet.datasets.keys import flat_key
from ovdet.util.progress import progress
from ovdet.text.prompts import parse_classes
from ovdet.runs.lock import LOCK_NAME, lock_output
from ovdet.runs.folder import ERRORS as _ERRORS
from ovdet.runs.folder import JOURNAL as _JOURNAL
from ovdet.runs.folder import MANIFEST as _MANIFEST
from ovdet.runs.folder import clear_outputs, error_record
from ovdet.datasets.formats import FORMATS, open_dataset_writers, parse_formats, rebuild_from_journal
from ovdet.datasets.previews import PreviewWriter
from ovdet.runs.journal import ImageRecord, Journal, read_journal, repair_journal
from ovdet.util.safeio import atomic_write, remove_stale_temp_files
from ovdet.datasets.splits import ValSplit
from ovdet.tiling import TileSpec, tile_spec
from ovdet.media.sources import LoadedImage, iter_image_files, prefetch_images, require_image_files
from ovdet.runs.write_errors import explain_write_errors

__all__ = ["AnnotateSummary", "annotate_folder"]

_MANIFEST_VERSION = 1
# Settings added after version 1, with the value a run.json written before them implies.
_ADDED_SETTINGS = {"val_split": 0.0, "split_seed": 0, "tile": None, "reduced_precision": None}
_NOT_UTF8 = ("its name is not valid UTF-8 (the bytes are shown as \\xNN), and ovdet's outputs are UTF-8 files "
             "that must name it: rename the file, e.g. with `convmv -f latin1 -t utf8`, and run again")


def _utf8(text: str) -> bool:
    """True when `text` can be written to a UTF-8 file (file names that were not valid UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _backend_words(detector: Any, ray_engine: Any) -> str | None:
    """"openvino fp32" for the summary line; for the Ray engine what the workers were asked to run."""
    if ray_engine is not None:
        return f"{ray_engine.backend} {ray_engine.precision or 'default precision'} on the workers"
    name, precision = getattr(detector, "backend", None), getattr(detector, "precision", None)
    return f"{name} {precision}" if isinstance(name, str) and isinstance(precision, str) else None


def _reduced_precision(detector: Any, ray_engine: Any) -> str | None:
    """bf16 / int8 when the run's detections come from a reduced-precision model (they differ a little from
    fp32, so a resume must not mix them); None for fp32 and fp16, whose detections agree with fp32 to ~1e-4."""
    precision = getattr(ray_engine, "precision", None) if ray_engine is not None else getattr(detector, "precision",
                                                                                             None)
    return precision if precision in ("bf16", "int8") else None


@dataclass
class AnnotateSummary:
    """What one annotate_folder call did."""

    source: str
    out: str
    images_found: int
    images_done: int  # annotated by this call
    images_already_done: int  # found finished in the journal of an earlier, interrupted call
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files
    detections_per_class: dict[str, int] = field(default_factory=dict)  # by this call
    seconds: float = 0.0
    split: tuple[int, int] | None = None  # (train, val) image counts with --val-split, all runs together
    backend: str | None = None  # what ran the model, e.g. "openvino fp32" (None: a detector without backends)

    @property
    def images_per_second(self) -> float:
        return self.images_done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line human summary."""
        n_det = sum(self.detections_per_class.values())
        per_class = ", ".join(f"{shown(k)} {v}" for k, v in self.detections_per_class.items() if v)
        parts = [f"annotated {self.images_done} image{'s' if self.images_done != 1 else ''}"]
        if self.images_already_done:
            parts.append(f"{self.images_already_done} already done")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (see {shown(Path(self.out) / _ERRORS)})")
        split = f" (split: {self.split[0]} train / {self.split[1]} val)" if self.split is not None else ""
        return (
            f"{'; '.join(parts)} in {self.seconds:.1f} s ({self.images_per_second:.1f} img/s"
            f"{', ' + self.backend if self.backend else ''}); "
            f"{n_det} detection{'s' if n_det != 1 else ''}{': ' + per_class if per_class else ''} -> {shown(self.out)}{split}"
        )


def annotate_folder(
    src: str | os.PathLike,
    classes: str | Sequence[str],
    out: str | os.PathLike,
    formats: str | Sequence[str] = FORMATS,
    detector: Any | Callable[[], Any] | None = None,
    model: str | os.PathLike = "yolov8s-worldv2",
    text_model: Any = None,
    device: str = "auto",
    half: bool | None = None,
    backend: str = "auto",
    precision: str | None = None,
    calib: str | os.PathLike | None = None,
    imgsz: int | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    batch: int = 8,
    save_annotated: bool = False,
    recursive: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    workers: int | None = None,
    checkpoint_s: float = 60.0,
    val_split: float = 0.0,
    split_seed: int = 0,
    engine: str | Any = "local",
    tile: int | TileSpec | None = None,
) -> AnnotateSummary:
    """Detect `classes` in every image under `src` and write the datasets named in `formats` to `out`.

    `detector` is an OVDetector (or a zero-argument function returning one, called only after the
    folders have been checked); without it one is built from model/text_model/device/half/backend/precision/
    calib/imgsz (see OVDetector).
    `formats` is any of "coco", "yolo", "voc", "jsonl" (list or comma-separated string); the JSONL
    journal `predictions.jsonl` is always written because resuming relies on it. Re-running with the
    same arguments resumes an interrupted run; different classes, model or settings raise
    ResumeMismatchError unless `overwrite` (which deletes the previous outputs first).
    `val_split` > 0 holds out that fraction of the images as the val split of the YOLO and COCO outputs,
    chosen by a hash of each image's path and `split_seed` (the same on every re-run and resume).
    `engine` is "local" (threads in this process) or "ray" (a Ray Data actor pool over a cluster; a
    `ovdet.engines.ray.RayEngine` sets its address and workers); `src` may then also be a URI such as
    s3://bucket/prefix. Both engines write the same outputs, and either can resume the other's run.
    `tile` (a tile size or an ovdet.tiling.TileSpec) runs sliced inference; its settings are part of the run's.
    Raises DatasetError up front for a missing or empty input folder, or an output folder inside it.
    """
    ray_engine = _ray_engine(engine)
    if ray_engine is None and "://" in os.fspath(src):
        raise DatasetError(f"{shown(src)}: the local engine reads folders; a URI source needs engine='ray' "
                           "(--engine ray)")
    if "://" in os.fspath(out):
        raise DatasetError(f"{shown(out)}: --out must be a folder (for --engine ray one that every node mounts at the same "
                           "path); writing the outputs to a URI is not supported")
    src_path, out_path = Path(src), Path(out)
    source = None if ray_engine is None else ray_engine.source(src, recursive=recursive)
    if source is None or source.local:
        src_path = source.folder if source is not None else src_path
        _check_folders(src_path, out_path)
    else:
        _check_out(out_path)
    fmts = parse_formats(formats)
    if batch < 1:
        raise DatasetError(f"batch must be at least 1, got {batch}")
    split = ValSplit(float(val_split), int(split_seed))
    tiling = tile_spec(tile)
    spec = parse_classes(classes)
    names = list(spec.names)
    if source is None or source.local:
        require_image_files(src_path, recursive=recursive)

    # One writer per output folder, held before the (slow) model load so a second run fails at once;
    # a full disk (or a read-only or vanished folder) ends the run with a clear word instead of a traceback.
    with explain_write_errors(out_path, lambda: _finished_note(out_path)), lock_output(out_path):
        if detector is None:
            from ovdet.detector import OVDetector

            kwargs: dict[str, Any] = {} if imgsz is None else {"imgsz": imgsz}
            if ray_engine is not None:  # the driver only encodes the classes; the workers run on `device`
                ray_engine = dataclasses.replace(ray_engine, device=device, half=half, backend=backend,
                                                 precision=precision, calib=None if calib is None else str(calib))
                device, half, backend, precision = "cpu", False, "torch", None
            detector = OVDetector(model, text_model=text_model, device=device, half=half, backend=backend,
                                  precision=precision, calib=calib, **kwargs)
        elif callable(detector) and not hasattr(detector, "detect_batch"):
            detector = detector()
        if getattr(detector, "class_spec", None) != spec:
            detector.set_classes(spec)

        settings = {
            "source": str(src_path.resolve()) if source is None or source.local else source.uri,
            "recursive": bool(recursive),
            "classes": json.loads(json.dumps(dataclasses.asdict(spec))),  # phrasings, thresholds, negatives too
            "model": detector.model_id,
            "text_model": detector.embeddings_source,
            "imgsz": imgsz if imgsz is not None else getattr(detector, "imgsz", None),
            "conf": float(conf),
            "iou": float(iou),
            "max_det": int(max_det),
            "formats": list(fmts),
            "save_annotated": bool(save_annotated),
            "reduced_precision": _reduced_precision(detector, ray_engine),
            "val_split": split.fraction,
            "split_seed": split.seed,
            "tile": tiling.settings() if tiling is not None else None,
        }
        _prepare_output(out_path, settings, overwrite)

        run = _Run(out_path, names, settings, fmts, save_annotated, checkpoint_s, split)
        try:
            done = run.load_journal()
            detect_kwargs: dict[str, Any] = {"conf": conf, "iou": iou, "max_det": max_det}
            if imgsz is not None:
                detect_kwargs["imgsz"] = imgsz
            if tiling is not None:
                detect_kwargs["tile"] = tiling
            start = time.perf_counter()
            if ray_engine is not None:
                found, already = ray_engine.run(run, source, done, detector, detect_kwargs, batch=batch, quiet=quiet)
            else:
                found, already = _run_local(run, src_path, done, detector, detect_kwargs, batch=batch,
                                            recursive=recursive, workers=workers, quiet=quiet)
            run.finish()
            seconds = time.perf_counter() - start
        finally:
            run.close()
    return AnnotateSummary(
        source=str(src_path), out=str(out_path), images_found=found, images_done=run.images_done,
        images_already_done=already, skipped=run.skipped,
        detections_per_class={n: run.counts.get(i, 0) for i, n in enumerate(names)}, seconds=seconds,
        split=(run.split_counts[0], run.split_counts[1]) if split.active else None,
        backend=_backend_words(detector, ray_engine),
    )


def _run_local(run: "_Run", src: Path, done: set[str], detector: Any, detect_kwargs: dict[str, Any], batch: int,
               recursive: bool, workers: int | None, quiet: bool) -> tuple[int, int]:
    """The local engine: decode in threads, detect in batches in this process; returns (found, already done)."""
    # Two walks instead of a list of every path: memory stays flat however large the folder is.
    found = already = 0
    for f in iter_image_files(src, recursive=recursive):
        found += 1
        already += f.relative_to(src).as_posix() in done
    pending = (f for f in iter_image_files(src, recursive=recursive) if f.relative_to(src).as_posix() not in done)
    chunk: list[LoadedImage] = []
    with progress(total=found, initial=already, unit="img", desc="annotate", quiet=quiet) as bar:
        # tiled images are large and their tiles batch by themselves: decode only two batches of images ahead
        ahead = 2 * batch if detect_kwargs.get("tile") is not None else max(2 * batch, 8)
        for item in prefetch_images(pending, workers=workers, ahead=ahead):
            if item.error is not None:
                run.record_error(item, src)
                bar.update(1)
                continue
            chunk.append(item)
            if len(chunk) == batch:
                run.process(chunk, detector.detect_batch([c.image for c in chunk], **detect_kwargs), src)
                bar.update(len(chunk))
                chunk = []
                run.maybe_checkpoint()
        if chunk:
            run.process(chunk, detector.detect_batch([c.image for c in chunk], **detect_kwargs), src)
            bar.update(len(chunk))
    return found, already


def _ray_engine(engine: str | Any) -> Any:
    """None for the local engine, else the RayEngine asked for ("ray" or a RayEngine); DatasetError otherwise."""
    if isinstance(engine, str) and engine.strip().lower() == "local":
        return None
    if isinstance(engine, str) and engine.strip().lower() == "ray":
        from ovdet.engines.ray import RayEngine

        return RayEngine()
    if hasattr(engine, "run") and hasattr(engine, "source"):
        return engine
    raise DatasetError(f"unknown engine {engine!r}: use 'local' (this process) or 'ray' (a Ray cluster)")


def _finished_note(out: Path) -> str:
    """What survives a failed write: the images whose journal line is whole."""
    try:
        with open(out / _JOURNAL, "rb") as fh:
            done = sum(line.endswith(b"\n") for line in fh)
    except OSError:
        done = 0
    if not done:
        return "No image was finished before this."
    return f"The {done} image{'s' if done != 1 else ''} finished before this {'are' if done != 1 else 'is'} " \
           f"safe in {shown(out / _JOURNAL)}."


def _check_folders(src: Path, out: Path) -> None:
    if not src.exists():
        raise DatasetError(f"{shown(src)}: input folder does not exist; check the path")
    if not src.is_dir():
        raise DatasetError(f"{shown(src)}: is a file, not a folder; annotate takes a folder of images")
    src_r, out_r = src.resolve(), out.resolve()
    if not _utf8(str(src_r)):  # every image's path (and run.json) would hold the undecodable bytes
        raise DatasetError(f"{shown(src_r)}: the input folder's path is not valid UTF-8 (the bytes are shown as "
                           "\\xNN), and ovdet's outputs are UTF-8 files that must name it: rename the folder")
    if out_r == src_r or src_r in out_r.parents:
        raise DatasetError(
            f"output folder {shown(out)} is inside the input folder {shown(src)}: its previews and links would be "
            "picked up as input; choose an --out folder outside the input folder"
        )
    _check_out(out)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{shown(out)}: output path exists and is a file; choose a folder")
    if out.is_dir() and not (out / _MANIFEST).exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise DatasetError(
            f"{shown(out)}: folder is not empty and holds no ovdet annotate run; choose an empty or new "
            "--out folder (--overwrite deletes only ovdet's own output files, so it does not help here)"
        )


def _prepare_output(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Clear (overwrite), check (resume) or create the output folder, then write run.json."""
    manifest = out / _MANIFEST
    if out.exists():
        if overwrite:
            clear_outputs(out)
        elif manifest.exists():
            try:
                previous = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{shown(manifest)}: unreadable ({shown(exc)}); pass --overwrite to start over") \
                    from exc
            old = {**_ADDED_SETTINGS, **previous.get("settings", {})}
            diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            if diffs:
                raise ResumeMismatchError(
                    f"{shown(out)} holds an earlier annotate run with other settings ({'; '.join(diffs)}). "
                    "Re-run with the same settings to resume it, pass --overwrite to start over, "
                    "or choose another --out folder."
                )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    atomic_write(manifest, json.dumps({"version": _MANIFEST_VERSION, "settings": settings},
                                      ensure_ascii=False, indent=2) + "\n")


class _Run:
    """The writers of one annotate call and the bookkeeping between them."""

    def __init__(self, out: Path, classes: list[str], settings: dict[str, Any], formats: tuple[str, ...],
                 save_annotated: bool, checkpoint_s: float, split: ValSplit):
        self.out, self.classes = out, classes
        self.journal_path = out / _JOURNAL
        info = {"description": "ovdet annotate", "model": settings["model"], "source": settings["source"]}
        self.writers, self.coco = open_dataset_writers(out, classes, formats, info, split)
        self.split = split
        self.split_counts = [0, 0]  # images in the (train, val) split, finished ones of earlier runs included
        self.preview = PreviewWriter(out / "annotated", classes) if save_annotated else None
        if self.preview is not None:
            self.preview.start()
        self.journal: Journal | None = None
        self.errors: Journal | None = None
        self.used_keys: set[str] = set()
        self.counts: Counter[int] = Counter()
        self.skipped: list[tuple[str, str]] = []
        self.images_done = 0
        self.checkpoint_s = checkpoint_s
        self.last_checkpoint = time.monotonic()

    def load_journal(self) -> set[str]:
        """Repair the journal, open it for appending and return the images it already holds."""
        repair_journal(self.journal_path)
        done: set[str] = set()
        if self.journal_path.exists():
            for rec in read_journal(self.journal_path):
                done.add(rec["image"])
                self.used_keys.add(rec["key"].lower())
                self.split_counts[self.split.is_val(rec["image"])] += 1
        self.journal = Journal(self.journal_path)
        # the COCO file(s) and split lists exist (and match the journal) from the start
        rebuild_from_journal(self.writers, self.coco, self.journal_path)
        # Unreadable files are retried on every run, so their old records go.
        atomic_write(self.out / _ERRORS, b"")
        self.errors = Journal(self.out / _ERRORS)
        return done

    def key_for(self, rel: str) -> str:
        """A flat output file stem unique in this run (see ovdet.datasets.keys): sub/dir/a.jpg -> sub__dir__a."""
        return flat_key(rel, self.used_keys)

    def record_error(self, item: LoadedImage, src: Path) -> None:
        path = Path(item.source)
        self.add_error(error_record(path.relative_to(src).as_posix(), os.path.abspath(path), item.error, path))

    def add_error(self, record: dict[str, str]) -> None:
        """Append one errors.jsonl record (image, path, reason) of a file that could not be read; a name that is
        not valid UTF-8 is written with its bytes escaped (\\xNN), since JSON in UTF-8 cannot hold it."""
        record = {k: v if not isinstance(v, str) or _utf8(v) else shown(v) for k, v in record.items()}
        self.errors.append(record)
        self.skipped.append((record["path"], record["reason"]))

    def process(self, chunk: list[LoadedImage], results: list[Any], src: Path) -> None:
        """Write every output of each image, journal entry last (it marks the image as done)."""
        if len(results) != len(chunk):
            raise RuntimeError(f"the detector returned {len(results)} results for {len(chunk)} images")
        for item, dets in zip(chunk, results):
            path = Path(item.source)
            rel = path.relative_to(src).as_posix()
            rec = ImageRecord.from_detections(rel, os.path.abspath(path), self.key_for(rel), item.image.shape, dets)
            self.write(rec, item.image)

    def write(self, rec: ImageRecord, image: Any = None) -> None:
        """Write every output of one image (the preview only given its pixels), journal entry last; an image whose
        name is not valid UTF-8 goes to errors.jsonl instead, since no UTF-8 output file can name it."""
        if not (_utf8(rec.image) and _utf8(rec.path)):
            self.add_error({"image": rec.image, "path": rec.path, "reason": _NOT_UTF8})
            return
        for writer in self.writers:
            writer.write(rec)
        if self.preview is not None and image is not None:
            self.preview.write(rec, image)
        self.journal.append(rec.to_json(self.classes))
        self.counts.update(rec.class_ids.tolist())
        self.split_counts[self.split.is_val(rec.image)] += 1
        self.images_done += 1

    def maybe_checkpoint(self) -> None:
        """Every checkpoint_s seconds: fsync the journal and refresh the COCO file from it."""
        if time.monotonic() - self.last_checkpoint < self.checkpoint_s:
            return
        began = time.monotonic()
        self._checkpoint()
        # Keep checkpoints at most ~5% of the run even when the COCO file gets large.
        self.checkpoint_s = max(self.checkpoint_s, 20 * (time.monotonic() - began))
        self.last_checkpoint = time.monotonic()

    def _checkpoint(self) -> None:
        self.journal.sync()
        self.errors.sync()
        rebuild_from_journal(self.writers, self.coco, self.journal_path, end=self.journal.size())

    def finish(self) -> None:
        self._checkpoint()
        empty = [name for name, n in zip(("train", "val"), self.split_counts) if n == 0]
        if self.split.active and empty and any(self.split_counts):
            warnings.warn(f"the {empty[0]} split is empty: --val-split {self.split.fraction:g} put "
                          f"{self.split_counts[1]} of {sum(self.split_counts)} images in val. Use a fraction that "
                          "leaves images on both sides (or more images) for a dataset ultralytics can train on.",
                          OVDetWarning, stacklevel=2)

    def close(self) -> None:
        for j in (self.journal, self.errors):
            if j is not None:
                j.close()
