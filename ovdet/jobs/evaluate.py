"""Score a detector on a labelled dataset (YOLO data.yaml or COCO json): COCO-style mAP50 and mAP50-95 (of masks too,
when the detector makes masks and the dataset has them: ovdet.jobs.evalmasks)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import supervision as sv
from supervision.metrics import MeanAveragePrecision

from ovdet.errors import DatasetError
from ovdet.jobs.evaldata import LabelledDataset, LabelledImage, load_dataset
from ovdet.jobs.evalmasks import MaskTally, detector_masks, prediction_rles
from ovdet.masks.rle import DATA_KEY as MASK_RLE_KEY
from ovdet.util.progress import progress as progress_display
from ovdet.runs.folder import JOURNAL, MANIFEST, check_output_folder, clear_outputs
from ovdet.runs.lock import lock_output
from ovdet.runs.journal import ImageRecord, Journal
from ovdet.util.safeio import atomic_write
from ovdet.media.sources import prefetch_images
from ovdet.tiling import TileSpec, tile_spec

if TYPE_CHECKING:
    from ovdet.detector import OVDetector

__all__ = ["ClassScore", "EvalResult", "LabelledDataset", "LabelledImage", "compute_map", "evaluate", "load_dataset",
           "parse_mapping"]


@dataclass
class ClassScore:
    """AP of one prompt over the dataset classes scored under it."""

    name: str  # the prompt the detector was given
    dataset_classes: list[str]  # dataset class names scored under this prompt
    instances: int
    ap50: float
    ap50_95: float
    mask_ap50: float | None = None  # with masks (EvalResult.mask_map50)
    mask_ap50_95: float | None = None


@dataclass
class EvalResult:
    """COCO-style scores of one evaluation: overall (mean over classes with objects) and per class."""

    map50: float
    map50_95: float
    images: int
    instances: int
    classes: list[ClassScore]
    skipped: list[str] = field(default_factory=list)  # images that could not be read
    mask_map50: float | None = None  # mask mAP (COCOeval "segm"): None unless the detector and the dataset have masks
    mask_map50_95: float | None = None
    masks_note: str = ""  # why there is no mask mAP, when one side has masks

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A fixed-width table: the overall row, then one row per scored class (mask mAP columns with masks)."""
        width = max([len("class"), len("all"), *(len(c.name) for c in self.classes)])
        masked = self.mask_map50 is not None
        head = f"  {'mask50':>6}  {'mask50-95':>9}" if masked else ""

        def cells(a: float | None, b: float | None) -> str:
            return "" if not masked else f"  {a or 0.0:>6.3f}  {b or 0.0:>9.3f}" if a is not None else f"{'':19}"

        rows = [f"{'class':<{width}}  {'images':>6}  {'instances':>9}  {'mAP50':>6}  {'mAP50-95':>8}{head}",
                f"{'all':<{width}}  {self.images:>6}  {self.instances:>9}  {self.map50:>6.3f}  {self.map50_95:>8.3f}"
                f"{cells(self.mask_map50, self.mask_map50_95)}"]
        rows += [f"{c.name:<{width}}  {'':>6}  {c.instances:>9}  {c.ap50:>6.3f}  {c.ap50_95:>8.3f}"
                 f"{cells(c.mask_ap50, c.mask_ap50_95)}" for c in self.classes]
        return "\n".join(rows + ([f"masks: {self.masks_note}"] if self.masks_note else []))


def compute_map(predictions: Sequence[sv.Detections], targets: Sequence[sv.Detections],
                names: Sequence[str]) -> EvalResult:
    """COCO mAP of per-image predictions against targets; class ids index `names` (classes without targets skip)."""
    if len(predictions) != len(targets):
        raise DatasetError(f"{len(predictions)} prediction sets for {len(targets)} images: give one per image.")
    counts = np.bincount(np.concatenate([t.class_id for t in targets] + [np.zeros(0, int)]).astype(int),
                         minlength=len(names))
    if counts.sum() == 0:
        raise DatasetError("The dataset has no labelled objects of the evaluated classes: nothing to score.")
    result = MeanAveragePrecision().update(list(predictions), list(targets)).compute()
    scores = []
    for class_id, ap in zip(result.matched_classes.tolist(), result.ap_per_class):
        valid = ap[ap >= 0]
        scores.append(ClassScore(name=names[class_id], dataset_classes=[names[class_id]],
                                 instances=int(counts[class_id]), ap50=float(max(ap[0], 0.0)),
                                 ap50_95=float(valid.mean()) if len(valid) else 0.0))
    return EvalResult(map50=float(max(result.map50, 0.0)), map50_95=float(max(result.map50_95, 0.0)),
                      images=len(targets), instances=int(counts.sum()), classes=scores)


# ---------------------------------------------------------------- running a detector


def parse_mapping(text: str | None, names: Sequence[str]) -> dict[str, str]:
    """--map "dataset name=prompt,other=prompt" -> {dataset name: prompt}; names must exist in the dataset."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise DatasetError(f"--map item {item.strip()!r} needs the form 'dataset_name=prompt'.")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in names:
            raise DatasetError(f"--map names {key!r}, which is not a dataset class; the classes are: {list(names)}.")
        if not value:
            raise DatasetError(f"--map gives {key!r} an empty prompt.")
        mapping[key] = value
    return mapping


def _batches(dataset: LabelledDataset, batch: int) -> Iterator[list]:
    chunk: list = []
    for loaded in prefetch_images([im.path for im in dataset.images]):
        chunk.append(loaded)
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate(detector: OVDetector, dataset: LabelledDataset, classes: Sequence[str] | None = None,
             mapping: Mapping[str, str] | None = None, conf: float = 0.001, iou: float = 0.7,
             batch: int = 8, progress: bool = True, out: str | os.PathLike | None = None,
             tile: int | TileSpec | None = None, exemplars: Sequence[Any] = ()) -> EvalResult:
    """Run `detector` over the dataset and score it.

    Each dataset class is scored under its prompt (`mapping[name]`, else its own name). The detector is given
    `classes` (default: the prompts of all dataset classes); dataset classes whose prompt is not among them are
    left out of the score, and so are detections of prompts that name no dataset class.
    With `out`, the run is saved there as a run folder (run.json with settings and scores, predictions.jsonl
    with each image's predictions and ground truth) that `ovdet report` reads; an earlier eval run there is
    replaced. `tile` (a tile size or an ovdet.tiling.TileSpec) scores sliced inference. `exemplars`
    (ovdet.Exemplar) show the class of their name (a dataset class or a `mapping` target): without `classes` it
    is scored by its exemplars alone, with `classes` naming it too by exemplars fused with the words; negative
    ones drop boxes.
    """
    with ExitStack() as stack:
        run = None
        if out is not None:
            stack.enter_context(lock_output(out))
            run = stack.enter_context(_EvalRun(Path(out)))
        return _evaluate(detector, dataset, classes, mapping, conf, iou, batch, progress, run, tile_spec(tile),
                         list(exemplars))


def _evaluate(detector: OVDetector, dataset: LabelledDataset, classes: Sequence[str] | None,
              mapping: Mapping[str, str] | None, conf: float, iou: float, batch: int, progress: bool,
              run: _EvalRun | None, tiling: TileSpec | None = None, exemplars: Sequence[Any] = ()) -> EvalResult:
    """evaluate() without the output folder handling."""
    mapping = dict(mapping or {})
    prompt_of = [mapping.get(n, n) for n in dataset.names]
    shown_by = [e.name for e in exemplars if not e.negative]  # classes given by example: scored by their exemplars
    prompts = list(classes) if classes else [p for p in dict.fromkeys(prompt_of) if p not in shown_by]
    named = prompts + shown_by
    scored = [p for p in dict.fromkeys(prompt_of) if p in named]  # evaluation categories, dataset order
    if not scored:
        raise DatasetError(f"None of the prompts {prompts} names a dataset class ({dataset.names}): "
                           "use the dataset's names or map them with --map 'dataset_name=prompt'.")
    if not dataset.images:
        raise DatasetError(f"{dataset.source} lists no images in this split.")
    gt_to_cat = np.array([scored.index(p) if p in scored else -1 for p in prompt_of], dtype=int)
    extra = {"exemplars": exemplars} if exemplars else {}
    # "!negatives" drop out of detector.classes, which the class ids index
    detector.set_classes(prompts or None, **extra)
    det_to_cat = np.array([scored.index(p) if p in scored else -1 for p in detector.classes], dtype=int)
    predictions, targets, skipped = [], [], []
    masks_on = detector_masks(detector)  # the detector makes masks: as RLEs, scored when the dataset has masks too
    tally = MaskTally() if masks_on and dataset.has_masks else None
    bar = progress_display(total=len(dataset.images), desc="eval", unit="img", quiet=not progress)
    for chunk in _batches(dataset, batch):
        ok = [c for c in chunk if c.error is None]
        for c in chunk:
            if c.error is not None:
                skipped.append(str(c.source))
                bar.write(f"ovdet: skipped {c.source}: {c.error}")
        extra = {"tile": tiling} if tiling is not None else {}
        extra.update({"mask_rle": True} if masks_on else {})
        results = detector.detect_batch([c.image for c in ok], conf=conf, iou=iou, **extra) if ok else []
        for c, dets in zip(ok, results):
            gt = dataset.images[c.index].targets(c.image.shape)
            gt.class_id = gt_to_cat[gt.class_id] if len(gt) else gt.class_id
            targets.append(gt[gt.class_id >= 0] if len(gt) else gt)
            cats = det_to_cat[dets.class_id] if len(dets) else dets.class_id
            keep = cats >= 0
            rles = prediction_rles(dets)
            data = {} if rles is None else {MASK_RLE_KEY: np.array([*rles, None], object)[:-1][keep]}
            predictions.append(sv.Detections(xyxy=dets.xyxy[keep], confidence=dets.confidence[keep],
                                             class_id=cats[keep], data=data))
            if tally is not None:
                gt_masks = dataset.images[c.index].masks(c.image.shape)
                tally.add(*c.image.shape[:2], [m for m, k in zip(gt_masks, gt.class_id >= 0) if k],
                          targets[-1].class_id, targets[-1].data.get("iscrowd"), list(data.get(MASK_RLE_KEY, [])),
                          predictions[-1].class_id, predictions[-1].confidence)
            if run is not None:
                run.add(dataset.images[c.index].path, c.image.shape, predictions[-1], targets[-1], scored)
        bar.update(len(chunk))
    bar.close()
    if not targets:
        raise DatasetError(f"No image of {dataset.source} could be read: check the image paths.")
    result = compute_map(predictions, targets, scored)
    for score in result.classes:
        score.dataset_classes = [n for n, p in zip(dataset.names, prompt_of) if p == score.name]
    result.skipped = skipped
    if tally is not None:
        masks = tally.scores(len(scored))
        result.mask_map50, result.mask_map50_95 = masks.map50, masks.map50_95
        for score in result.classes:
            score.mask_ap50, score.mask_ap50_95 = masks.per_class.get(scored.index(score.name), (None, None))
    elif masks_on:
        result.masks_note = (f"{dataset.source} has no masks (COCO segmentation or YOLO segment labels on every "
                             "object): no mask mAP")
    elif dataset.has_masks:
        result.masks_note = "the dataset has masks: give --masks NAME (e.g. grabcut) to score mask mAP too"
    if run is not None:
        spec = {"classes": [{"name": n, "prompts": [n], "conf": None} for n in scored], "negatives": [],
                "templates": [], "reduce": "max"}
        run.finish({"data": dataset.source, "classes": spec, "prompts": prompts, "model": detector.model_id,
                    "imgsz": getattr(detector, "imgsz", None), "conf": float(conf), "iou": float(iou),
                    "formats": ["jsonl"], "tile": tiling.settings() if tiling is not None else None,
                    "exemplars": [e.record() for e in exemplars], "masks": _segmenter_name(detector)}, result)
    return result


def _segmenter_name(detector: Any) -> str | None:
    """The detector's masks setting as run.json records it (as annotate does): a name, a file, a Segmenter's name."""
    masks = getattr(getattr(detector, "config", None), "masks", None) if detector_masks(detector) else None
    return None if masks is None else os.fspath(masks) if isinstance(masks, (str, os.PathLike)) \
        else str(getattr(masks, "name", masks))


class _EvalRun:
    """An eval run folder: predictions.jsonl (predictions and ground truth per image), then run.json."""

    def __init__(self, out: Path):
        self.out = out
        manifest = out / MANIFEST
        check_output_folder(out)
        if manifest.exists():
            try:
                kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
            except ValueError:
                kind = None
            if kind != "eval":
                raise DatasetError(f"{out} holds another kind of run ({kind or 'unreadable run.json'}); choose a "
                                   "new --out folder for the eval run")
            clear_outputs(out)
        self.journal = Journal(out / JOURNAL)
        self.count = 0
        self.images_root: str | None = None  # the folder holding every image: run.json's "source" (see image_problem)

    def add(self, path: Path, shape: tuple[int, ...], predictions: sv.Detections, targets: sv.Detections,
            names: Sequence[str]) -> None:
        """One image: its predictions (eval class ids) and its ground truth boxes."""
        rec = ImageRecord.from_detections(path.name, os.path.abspath(path), f"{self.count:06d}_{path.stem}",
                                          shape, predictions)
        line = rec.to_json(names)
        line["gt"] = [{"class_id": int(c), "class_name": names[int(c)], "bbox": [round(float(v), 2) for v in b]}
                      for b, c in zip(targets.xyxy, targets.class_id)]
        self.journal.append(line)
        self.count += 1
        folder = os.path.dirname(rec.path)
        self.images_root = folder if self.images_root is None else os.path.commonpath([self.images_root, folder])

    def finish(self, settings: dict, result: EvalResult) -> None:
        self.journal.sync()
        if self.images_root is not None and "source" not in settings:
            settings = {**settings, "source": self.images_root}
        atomic_write(self.out / MANIFEST, json.dumps({"version": 1, "kind": "eval", "settings": settings,
                                                      "result": result.to_dict()}, indent=2) + "\n")

    def __enter__(self) -> _EvalRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.journal.close()
