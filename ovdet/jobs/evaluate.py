"""Score a detector on a labelled dataset (YOLO data.yaml or COCO json): COCO-style mAP50 and mAP50-95."""

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
import yaml
from supervision.metrics import MeanAveragePrecision

from ovdet.errors import DatasetError
from ovdet.util.progress import progress as progress_display
from ovdet.runs.folder import JOURNAL, MANIFEST, check_output_folder, clear_outputs
from ovdet.runs.lock import lock_output
from ovdet.runs.journal import ImageRecord, Journal
from ovdet.util.safeio import atomic_write
from ovdet.media.sources import IMAGE_EXTENSIONS, list_image_files, prefetch_images
from ovdet.tiling import TileSpec, tile_spec

if TYPE_CHECKING:
    from ovdet.detector import OVDetector


@dataclass
class LabelledImage:
    """One image and its ground truth: boxes (N×4) as YOLO normalized xywh or COCO pixel xyxy, class ids."""

    path: Path
    boxes: np.ndarray
    class_ids: np.ndarray
    normalized: bool
    iscrowd: np.ndarray | None = None

    def targets(self, shape: tuple[int, ...]) -> sv.Detections:
        """Ground truth in pixel xyxy for an image of this (H, W, ...) shape."""
        boxes = self.boxes.astype(np.float64)
        if self.normalized and len(boxes):
            h, w = shape[:2]
            cx, cy, bw, bh = boxes.T
            boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], axis=1)
        data = {} if self.iscrowd is None else {"iscrowd": self.iscrowd}
        return sv.Detections(xyxy=boxes.reshape(-1, 4).astype(np.float32), class_id=self.class_ids.astype(int),
                             data=data)


@dataclass
class LabelledDataset:
    """A labelled split: class names (index = class id) and its images."""

    names: list[str]
    images: list[LabelledImage]
    source: str


@dataclass
class ClassScore:
    """AP of one prompt over the dataset classes scored under it."""

    name: str  # the prompt the detector was given
    dataset_classes: list[str]  # dataset class names scored under this prompt
    instances: int
    ap50: float
    ap50_95: float


@dataclass
class EvalResult:
    """COCO-style scores of one evaluation: overall (mean over classes with objects) and per class."""

    map50: float
    map50_95: float
    images: int
    instances: int
    classes: list[ClassScore]
    skipped: list[str] = field(default_factory=list)  # images that could not be read

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A fixed-width table: the overall row, then one row per scored class."""
        width = max([len("class"), len("all"), *(len(c.name) for c in self.classes)])
        rows = [f"{'class':<{width}}  {'images':>6}  {'instances':>9}  {'mAP50':>6}  {'mAP50-95':>8}",
                f"{'all':<{width}}  {self.images:>6}  {self.instances:>9}  {self.map50:>6.3f}  {self.map50_95:>8.3f}"]
        rows += [f"{c.name:<{width}}  {'':>6}  {c.instances:>9}  {c.ap50:>6.3f}  {c.ap50_95:>8.3f}"
                 for c in self.classes]
        return "\n".join(rows)


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


# ---------------------------------------------------------------- datasets


def load_dataset(source: str | Path, split: str = "val") -> LabelledDataset:
    """A YOLO dataset (data.yaml, or a folder holding one) or a COCO dataset (.json, or a folder holding one)."""
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"{path} does not exist: give a YOLO data.yaml, a COCO annotations .json, or their folder.")
    if path.is_dir():
        yamls = sorted(p for p in path.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
        jsons = sorted(path.glob("*.json"))
        if len(yamls) == 1:
            path = yamls[0]
        elif len(jsons) == 1 and not yamls:
            path = jsons[0]
        else:
            raise DatasetError(f"{path} holds {len(yamls)} yaml and {len(jsons)} json files: point to the one "
                               "data.yaml (YOLO) or annotations .json (COCO) to use.")
    if path.suffix in (".yaml", ".yml"):
        return _load_yolo(path, split)
    if path.suffix == ".json":
        return _load_coco(path)
    raise DatasetError(f"{path} is neither a YOLO data.yaml nor a COCO .json file.")


def _yolo_names(raw: object, path: Path) -> list[str]:
    if isinstance(raw, Mapping):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: 'names' keys must be class ids 0..N-1.") from exc
        if ids != list(range(len(ids))):
            raise DatasetError(f"{path}: 'names' keys must be the class ids 0..N-1 without gaps.")
        return [str(raw[k] if k in raw else raw[str(k)]) for k in ids]
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    raise DatasetError(f"{path} has no 'names': list the class names, e.g. names: {{0: person, 1: bus}}.")


def _yolo_image_files(entry: str, root: Path, path: Path) -> list[Path]:
    target = Path(entry) if Path(entry).is_absolute() else root / entry
    if target.is_dir():
        return list_image_files(target)
    if target.suffix == ".txt" and target.is_file():  # a list of image paths, relative to the dataset root
        lines = [ln.strip() for ln in target.read_text().splitlines() if ln.strip()]
        return [Path(ln) if Path(ln).is_absolute() else (root / ln) for ln in lines]
    if target.suffix.lower() in IMAGE_EXTENSIONS and target.is_file():
        return [target]
    raise DatasetError(f"{path}: split entry {entry!r} -> {target} is not an image folder or list file.")


def _load_yolo(path: Path, split: str) -> LabelledDataset:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path} could not be read as YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path} is not a YOLO data.yaml (expected keys train, val, names).")
    names = _yolo_names(data.get("names"), path)
    entries = data.get(split)
    if not entries:
        raise DatasetError(f"{path} has no '{split}' split: choose one of "
                           f"{[k for k in ('train', 'val', 'test') if data.get(k)]} with --split.")
    root = Path(data["path"]) if data.get("path") else path.parent
    root = root if root.is_absolute() or not data.get("path") else path.parent / root
    files = [f for e in (entries if isinstance(entries, list) else [entries])
             for f in _yolo_image_files(str(e), root, path)]
    images = []
    for f in files:
        boxes, cls = _read_yolo_labels(_label_path(f), len(names))
        images.append(LabelledImage(f, boxes, cls, normalized=True))
    return LabelledDataset(names, images, str(path))


def _read_yolo_labels(label: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized xywh boxes and class ids of one YOLO label file (missing file = no objects).

    Rows are 'class cx cy w h', or 'class x1 y1 x2 y2 ...' polygons (segment labels), scored by their boxes.
    """
    boxes, cls = [], []
    lines = label.read_text().splitlines() if label.is_file() else []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError as exc:
            raise DatasetError(f"{label}:{n}: not a YOLO label row ('class cx cy w h'): {line!r}.") from exc
        if len(values) == 5:
            boxes.append(values[1:])
        elif len(values) >= 7 and len(values) % 2 == 1:
            xy = np.array(values[1:]).reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            boxes.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        else:
            raise DatasetError(f"{label}:{n}: a row needs 'class cx cy w h' or a polygon, got {len(values)} numbers.")
        c = values[0]
        if c != int(c) or not 0 <= c < num_classes:
            raise DatasetError(f"{label}:{n}: class id {values[0]:g} is not one of the names 0..{num_classes - 1}.")
        cls.append(int(c))
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(cls, dtype=int)


def _label_path(image: Path) -> Path:
    """YOLO convention: .../images/x.png -> .../labels/x.txt (last 'images' folder in the path)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _load_coco(path: Path) -> LabelledDataset:
    try:
        coco = json.loads(path.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        images_meta = coco["images"]
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a COCO annotations file (needs images, annotations, categories).") from exc
    names = [str(c["name"]) for c in cats]
    index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[int, list[dict]] = {im["id"]: [] for im in images_meta}
    for ann in annotations:
        if ann.get("image_id") not in per_image or ann.get("category_id") not in index:
            raise DatasetError(f"{path}: annotation {ann.get('id')} refers to an unknown image or category.")
        per_image[ann["image_id"]].append(ann)
    images = []
    for meta in images_meta:
        anns = per_image[meta["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        candidates = [path.parent / meta["file_name"], path.parent / "images" / meta["file_name"]]
        file = next((c for c in candidates if c.exists()), candidates[0])
        images.append(LabelledImage(file, xyxy, np.array([index[a["category_id"]] for a in anns], dtype=int),
                                    normalized=False, iscrowd=np.array([int(a.get("iscrowd", 0)) for a in anns])))
    return LabelledDataset(names, images, str(path))


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
    bar = progress_display(total=len(dataset.images), desc="eval", unit="img", quiet=not progress)
    for chunk in _batches(dataset, batch):
        ok = [c for c in chunk if c.error is None]
        for c in chunk:
            if c.error is not None:
                skipped.append(str(c.source))
                bar.write(f"ovdet: skipped {c.source}: {c.error}")
        tiled = {"tile": tiling} if tiling is not None else {}
        results = detector.detect_batch([c.image for c in ok], conf=conf, iou=iou, **tiled) if ok else []
        for c, dets in zip(ok, results):
            gt = dataset.images[c.index].targets(c.image.shape)
            gt.class_id = gt_to_cat[gt.class_id] if len(gt) else gt.class_id
            targets.append(gt[gt.class_id >= 0] if len(gt) else gt)
            cats = det_to_cat[dets.class_id] if len(dets) else dets.class_id
            keep = cats >= 0
            predictions.append(sv.Detections(xyxy=dets.xyxy[keep], confidence=dets.confidence[keep],
                                             class_id=cats[keep]))
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
    if run is not None:
        spec = {"classes": [{"name": n, "prompts": [n], "conf": None} for n in scored], "negatives": [],
                "templates": [], "reduce": "max"}
        run.finish({"data": dataset.source, "classes": spec, "prompts": prompts, "model": detector.model_id,
                    "imgsz": getattr(detector, "imgsz", None), "conf": float(conf), "iou": float(iou),
                    "formats": ["jsonl"], "tile": tiling.settings() if tiling is not None else None,
                    "exemplars": [e.record() for e in exemplars]}, result)
    return result


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
