"""`annotate_folder`: pseudo-label a folder of images into COCO / YOLO / VOC / JSONL datasets, resumably.

The job checks the folders, builds the detector, writes run.json and hands the images to an engine
(ovdet.engines: local threads, or Ray), which writes them through a RunWriter (ovdet.runs.writer). Every finished
image is appended to `predictions.jsonl` (the journal) after its per-image files (YOLO txt, VOC xml, preview) are
in place; the COCO file is rebuilt from the journal at checkpoints and at the end. A run killed at any moment
and started again with the same arguments skips what the journal holds and does the rest, so every image ends up
exactly once in every output.

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

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovdet.config import DetectorConfig
from ovdet.datasets.formats import FORMATS, parse_formats
from ovdet.datasets.splits import ValSplit
from ovdet.engines import open_engine
from ovdet.engines.base import Detector, Engine, HasClassSpec, Work
from ovdet.errors import DatasetError, ResumeMismatchError
from ovdet.media.sources import require_image_files
from ovdet.runs.folder import ERRORS as _ERRORS
from ovdet.runs.folder import JOURNAL as _JOURNAL
from ovdet.runs.folder import MANIFEST as _MANIFEST
from ovdet.runs.folder import check_output_folder, clear_outputs
from ovdet.runs.lock import lock_output
from ovdet.runs.settings_diff import describe_changes
from ovdet.runs.write_errors import explain_write_errors
from ovdet.runs.writer import RunWriter, utf8
from ovdet.text.prompts import parse_classes
from ovdet.tiling import TileSpec, tile_spec
from ovdet.util.display import shown
from ovdet.util.safeio import atomic_write, remove_stale_temp_files

__all__ = ["AnnotateSummary", "annotate_folder"]

_MANIFEST_VERSION = 1
# Settings added after version 1, with the value a run.json written before them implies.
_ADDED_SETTINGS = {"val_split": 0.0, "split_seed": 0, "tile": None, "reduced_precision": None, "exemplars": []}


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
    detector: Detector | Callable[[], Detector] | None = None,
    config: DetectorConfig | None = None,
    *,
    batch: int = 8,
    save_annotated: bool = False,
    recursive: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    workers: int | None = None,
    checkpoint_s: float = 60.0,
    val_split: float = 0.0,
    split_seed: int = 0,
    engine: str | Engine = "local",
    tile: int | TileSpec | None = None,
    **options: Any,
) -> AnnotateSummary:
    """Detect `classes` in every image under `src` and write the datasets named in `formats` to `out`.

    The model options come from `config` (an ovdet.DetectorConfig) and from keyword arguments named like its fields,
    which override it: model, text_model, device, half, backend, precision, calib, threads, trust_weights, and imgsz,
    conf, iou, max_det, which are also the run's detection settings (recorded in run.json).
    `detector` is an OVDetector (or a zero-argument function returning one, called only after the
    folders have been checked); without it one is built from the config. The run's conf, iou, max_det (and imgsz,
    when set) apply to every detection whatever the detector's own are.
    `formats` is any of "coco", "yolo", "voc", "jsonl" (list or comma-separated string); the JSONL
    journal `predictions.jsonl` is always written because resuming relies on it. Re-running with the
    same arguments resumes an interrupted run; different classes, model or settings raise
    ResumeMismatchError unless `overwrite` (which deletes the previous outputs first).
    `val_split` > 0 holds out that fraction of the images as the val split of the YOLO and COCO outputs,
    chosen by a hash of each image's path and `split_seed` (the same on every re-run and resume).
    `engine` is "local" (threads in this process; `workers` decoding threads) or "ray" (a Ray Data actor pool over a
    cluster; a `ovdet.engines.ray.RayEngine` sets its address and workers), or any ovdet.engines.base.Engine; `src`
    may then also be a URI such as s3://bucket/prefix. Both engines write the same outputs, and either can resume
    the other's run.
    `tile` (a tile size or an ovdet.tiling.TileSpec) runs sliced inference; its settings are part of the run's.
    `masks` (a segmenter name, see DetectorConfig.masks) gives every box an instance mask in every output: an RLE
    in predictions.jsonl and COCO, a polygon in YOLO labels, VOC SegmentationObject PNGs; it is part of the run's
    settings, and each image's masks are RLEs as soon as they are made.
    Raises DatasetError up front for a missing or empty input folder, or an output folder inside it.
    """
    eng = open_engine(engine)
    cfg = (config if config is not None else DetectorConfig()).replace(**options)
    source = eng.source(src, recursive=recursive)
    if cfg.precision == "int8" and cfg.calib is None and source.folder is not None:
        cfg = cfg.replace(calib=str(source.folder))  # int8 calibrates on the images it is about to annotate
    if "://" in os.fspath(out):
        raise DatasetError(f"{shown(out)}: --out must be a folder (for --engine ray one that every node mounts at the same "
                           "path); writing the outputs to a URI is not supported")
    out_path = Path(out)
    if source.folder is not None:
        _check_folders(source.folder, out_path)
    else:
        _check_out(out_path)
    fmts = parse_formats(formats)
    if batch < 1:
        raise DatasetError(f"batch must be at least 1, got {batch}")
    split = ValSplit(float(val_split), int(split_seed))
    tiling = tile_spec(tile)
    spec = parse_classes(classes)
    names = list(spec.names)
    if source.folder is not None:
        require_image_files(source.folder, recursive=recursive)

    # One writer per output folder, held before the (slow) model load so a second run fails at once;
    # a full disk (or a read-only or vanished folder) ends the run with a clear word instead of a traceback.
    with explain_write_errors(out_path, lambda: _finished_note(out_path)), lock_output(out_path):
        if detector is None:
            from ovdet.detector import OVDetector

            detector = OVDetector.from_config(eng.driver_config(cfg))
        elif not isinstance(detector, Detector):
            detector = detector()
        if not (isinstance(detector, HasClassSpec) and detector.class_spec == spec):
            detector.set_classes(spec)
        runtime = eng.runtime(detector, cfg)

        settings = {
            "source": source.uri,
            "recursive": bool(recursive),
            "classes": spec.record(),  # phrasings, thresholds, negatives too
            "exemplars": spec.exemplar_records(),  # image sha256, box, source: resume refuses another set
            "model": detector.model_id,
            "text_model": detector.embeddings_source,
            "imgsz": cfg.imgsz if cfg.imgsz is not None else detector.imgsz,
            "conf": float(cfg.conf),
            "iou": float(cfg.iou),
            "max_det": int(cfg.max_det),
            "formats": list(fmts),
            "save_annotated": bool(save_annotated),
            "reduced_precision": runtime.reduced_precision,
            "val_split": split.fraction,
            "split_seed": split.seed,
            "tile": tiling.settings() if tiling is not None else None,
            "masks": None if cfg.masks is None else os.fspath(cfg.masks) if isinstance(cfg.masks, (str, os.PathLike))
            else cfg.masks.name,  # a name, a SAM file, or a Segmenter's name
        }
        _prepare_output(out_path, settings, overwrite)

        writer = RunWriter(out_path, names, settings, fmts, save_annotated, checkpoint_s, split)
        try:
            done = writer.load_journal()
            detect_kwargs: dict[str, Any] = {"conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det}
            if cfg.imgsz is not None:
                detect_kwargs["imgsz"] = cfg.imgsz
            if tiling is not None:
                detect_kwargs["tile"] = tiling
            if cfg.masks is not None:
                detect_kwargs.update(masks=cfg.masks, mask_rle=True)  # RLEs at once: no dense masks per batch
            start = time.perf_counter()
            found, already = eng.run(Work(source, done, detector, cfg, detect_kwargs, batch, quiet, workers), writer)
            writer.finish()
            seconds = time.perf_counter() - start
        finally:
            writer.close()
    return AnnotateSummary(
        source=str(source.folder if source.folder is not None else Path(src)), out=str(out_path), images_found=found,
        images_done=writer.images_done, images_already_done=already, skipped=writer.skipped,
        detections_per_class={n: writer.counts.get(i, 0) for i, n in enumerate(names)}, seconds=seconds,
        split=(writer.split_counts[0], writer.split_counts[1]) if split.active else None,
        backend=runtime.words(),
    )


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
    if not utf8(str(src_r)):  # every image's path (and run.json) would hold the undecodable bytes
        raise DatasetError(f"{shown(src_r)}: the input folder's path is not valid UTF-8 (the bytes are shown as "
                           "\\xNN), and ovdet's outputs are UTF-8 files that must name it: rename the folder")
    if out_r == src_r or src_r in out_r.parents:
        raise DatasetError(
            f"output folder {shown(out)} is inside the input folder {shown(src)}: its previews and links would be "
            "picked up as input; choose an --out folder outside the input folder"
        )
    _check_out(out)


def _check_out(out: Path) -> None:
    check_output_folder(out, "annotate ",
                        " (--overwrite deletes only ovdet's own output files, so it does not help here)")


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
            diffs = describe_changes(old, settings)
            if diffs:
                raise ResumeMismatchError(
                    f"{shown(out)} holds an earlier annotate run with other settings: {'; '.join(diffs)}. "
                    "Re-run with the same settings to resume it, pass --overwrite to start over, "
                    "or choose another --out folder."
                )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    atomic_write(manifest, json.dumps({"version": _MANIFEST_VERSION, "settings": settings},
                                      ensure_ascii=False, indent=2) + "\n")
