"""Fine-tune (or train from a yaml config) a YOLO-World detector with ultralytics, class texts encoded by ovdet."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from ultralytics.models.yolo.world import train as world_train
from ultralytics.nn.tasks import WorldModel
from ultralytics.utils import DEFAULT_CFG, RANK

from ovdet.weights.checkpoint import TEXT_ENCODER_KEY, TRUST_HINT, load_checkpoint
from ovdet.errors import DatasetError, ModelError, WeightsUnsafeError
from ovdet.jobs.evaluate import LabelledDataset, load_dataset
from ovdet.weights.modelconfig import build_world_model, check_model_config, read_model_yaml
from ovdet.text.tower import TextEncoder
from ovdet.model.world import CONFIG_TRUST_HINT, load_world_checkpoint
from ovdet.util.device import select_device

METRIC_KEYS = {"precision": "metrics/precision(B)", "recall": "metrics/recall(B)",
               "mAP50": "metrics/mAP50(B)", "mAP50-95": "metrics/mAP50-95(B)"}


class OVDetWorldTrainer(world_train.WorldTrainer):
    """ultralytics' WorldTrainer with class-name embeddings from an ovdet TextEncoder instead of the `clip` package."""

    def __init__(self, text_encoder: TextEncoder, cfg: Any = DEFAULT_CFG, overrides: dict | None = None,
                 _callbacks: dict | None = None, trust_weights: bool = False):
        super().__init__(cfg, overrides, _callbacks)
        self.text_encoder = text_encoder
        self.trust_weights = trust_weights

    def setup_model(self) -> dict | None:
        """ultralytics' setup, with the starting checkpoint read by ovdet's safe loader instead of plain pickle."""
        if self.trust_weights or isinstance(self.model, torch.nn.Module):
            return super().setup_model()
        cfg, weights, ckpt = self.model, None, None
        if str(self.model).lower().endswith(".pt"):
            weights, ckpt = load_world_checkpoint(Path(self.model))
            cfg = weights.yaml
        if isinstance(self.args.pretrained, (str, Path)):
            weights, _ = load_world_checkpoint(Path(self.args.pretrained))
        elif self.args.pretrained is False:
            weights = None
        self.model = self.get_model(cfg=cfg, weights=weights, verbose=RANK in {-1, 0})
        return ckpt

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> WorldModel:
        if self.trust_weights:
            model = super().get_model(cfg, weights, verbose)
        else:
            # configs are data: a checkpoint's model.yaml or a yaml file, checked against ovdet's schema and built
            # by ovdet (never from the yaml_file a checkpoint names, never an eval of its activation)
            source = str(self.args.model)
            checked = (check_model_config(cfg, source, TRUST_HINT) if isinstance(cfg, dict)
                       else read_model_yaml(cfg, CONFIG_TRUST_HINT))
            model = build_world_model(checked, source, ch=self.data["channels"], nc=min(self.data["nc"], 80),
                                      verbose=verbose and RANK == -1)
            if weights:
                model.load(weights)
        dim = int(model.txt_feats.shape[-1])
        if self.text_encoder.dim != dim:
            raise ModelError(f"The text tower gives {self.text_encoder.dim}-d embeddings but this detector expects "
                             f"{dim}-d: use a text tower with projection_dim={dim}.")
        # ultralytics' callback sets the EMA model's classes through its CLIP path; ours uses the text tower
        hooks = self.callbacks["on_pretrain_routine_end"]
        hooks[:] = [h for h in hooks if h is not world_train.on_pretrain_routine_end]
        if _set_eval_classes not in hooks:
            hooks.append(_set_eval_classes)
        return model

    def generate_text_embeddings(self, texts: list[str], batch: int, cache_dir: Path) -> dict[str, torch.Tensor]:
        """Embeddings of every class text in the training set (kept in memory; never cached next to the data)."""
        emb = self.text_encoder.encode(texts).float().to(self.device)
        return dict(zip(texts, emb))


def _set_eval_classes(trainer: OVDetWorldTrainer) -> None:
    """Give the EMA model (what validation and the checkpoints use) the dataset's class embeddings."""
    names = [n.split("/", 1)[0] for n in trainer.test_loader.dataset.data["names"].values()]
    ema = trainer.ema.ema
    ema.txt_feats = trainer.text_encoder.encode(names).float().to(trainer.device)[None]
    ema.model[-1].nc = len(names)


@dataclass
class TrainResult:
    checkpoint: Path  # OUT/model.pt: loadable by OVDetector(model=...)
    metrics: dict[str, float]  # precision, recall, mAP50, mAP50-95 of the best epoch on the val split
    epochs: int
    seconds: float


def _ultralytics_device(device: str | torch.device) -> str:
    dev = select_device(device)
    if dev.type == "cuda":
        return str(dev.index or 0)
    return dev.type


def _write_yolo_copy(dataset: LabelledDataset, split_dir: Path) -> None:
    """Link the images of a (COCO) dataset under split_dir/images and write YOLO labels under split_dir/labels."""
    from PIL import Image

    for sub in ("images", "labels"):
        (split_dir / sub).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(dataset.images):
        if not image.path.is_file():
            raise DatasetError(f"{dataset.source}: image {image.path} does not exist.")
        name = f"{i:06d}_{image.path.stem}"
        link = split_dir / "images" / f"{name}{image.path.suffix}"
        link.symlink_to(image.path.resolve())
        with Image.open(image.path) as im:
            w, h = im.size
        rows = []
        for (x1, y1, x2, y2), c in zip(image.boxes.tolist(), image.class_ids.tolist()):
            rows.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        (split_dir / "labels" / f"{name}.txt").write_text("".join(r + "\n" for r in rows))


DATA_KEYS = ("path", "train", "val", "test", "names", "nc", "channels")  # what ovdet passes on from a data.yaml
TRUST_DATA_HINT = ("If you trust this data.yaml and where it came from, pass --trust-data (CLI) or trust_data=True "
                   "(Python): ultralytics then reads it as is, and runs or fetches its `download`.")


def _normal(path: Path) -> Path:
    """An absolute path with `..` folded, symlinks kept: where a data.yaml's text points, lexically."""
    return Path(os.path.normpath(os.path.abspath(path)))


def _inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([path, root]) == str(root)


def _check_split(key: str, entry: str, root: Path, source: Path) -> None:
    """A split entry, and for a .txt list of images each of its lines as ultralytics reads it (`./x` relative to
    the list, other relative lines relative to the working folder), must lie inside the dataset root."""
    target = _normal(Path(entry) if Path(entry).is_absolute() else root / entry)
    lines = [(entry, target)]
    if _inside(target, root) and target.suffix == ".txt" and target.is_file():
        for line in target.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            line = line.strip()
            if line:
                lines.append((line, _normal(target.parent / line[2:] if line.startswith("./") else Path(line))))
    for text, path in lines:
        if not _inside(path, root):
            raise DatasetError(f"{source}: {key} entry {text!r} points outside the dataset root {root} (to {path}): "
                               f"keep every split inside it. {TRUST_DATA_HINT}")


def check_data_yaml(raw: dict, source: Path) -> dict:
    """The keys of a YOLO data.yaml that ovdet hands to ultralytics, checked as data (no --trust-data).

    `download` is refused: ultralytics runs it (Python source or a shell command) or fetches it (a URL) when a split
    is missing. `path` must stay inside the yaml's folder and every split (train/val/test, and the lines of a .txt
    list) inside the dataset root, compared lexically (`..` folded; symlinks inside the dataset are its owner's
    choice). Other keys are dropped; `path` comes back absolute.
    """
    if raw.get("download") not in (None, ""):
        raise DatasetError(f"{source} has a 'download' field ({str(raw['download'])[:80]!r}): ultralytics would run "
                           f"or fetch it when a split folder is missing. Remove it. {TRUST_DATA_HINT}")
    folder = _normal(source.parent)
    root = folder
    if raw.get("path") not in (None, ""):
        root = _normal(folder / str(raw["path"]))
        if not _inside(root, folder):
            raise DatasetError(f"{source}: 'path: {raw['path']}' points outside the folder of the yaml ({folder}): "
                               f"move the data.yaml into its dataset folder. {TRUST_DATA_HINT}")
    for key in ("train", "val", "test"):
        entries = raw.get(key)
        for entry in (entries if isinstance(entries, list) else [] if entries in (None, "") else [entries]):
            _check_split(key, str(entry), root, source)
    if "channels" in raw and not (isinstance(raw["channels"], int) and 1 <= raw["channels"] <= 64):
        raise DatasetError(f"{source}: 'channels: {raw['channels']!r}' is not an image channel count such as 3.")
    checked = {k: raw[k] for k in DATA_KEYS if raw.get(k) is not None}
    checked["path"] = str(root)
    return checked


def _checked_data_yaml(data: str | Path, trust_data: bool) -> dict | None:
    """check_data_yaml of the data.yaml load_dataset will read for `data` (the file, or the one yaml in a folder);
    None for COCO input or with `trust_data`."""
    path = Path(data)
    if path.is_dir():
        yamls = [p for p in path.glob("*.y*ml") if p.suffix in (".yaml", ".yml")]
        path = yamls[0] if len(yamls) == 1 else path
    if trust_data or path.suffix not in (".yaml", ".yml") or not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path} could not be read as YAML ({exc}).") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a YOLO data.yaml (expected keys train, val, names).")
    return check_data_yaml(raw, path)


def prepare_data(data: str | Path, out: Path, classes: Sequence[str] | None = None,
                 val_data: str | Path | None = None, trust_data: bool = False) -> tuple[Path, list[str]]:
    """A data.yaml ultralytics can train on, and the class texts it trains with.

    A YOLO data.yaml is checked as data (check_data_yaml) and its checked keys written to out/data.yaml, with
    `classes` as its names when given; `trust_data` hands the file to ultralytics as is instead (renamed classes
    still go through a copy). A COCO .json is converted (images linked, labels written) under out/data. `classes`
    gives the prompt of each class id, in order.
    """
    checked = _checked_data_yaml(data, trust_data)  # before the dataset is listed: its splits may point anywhere
    train_set = load_dataset(data, split="train")
    names = list(classes) if classes else train_set.names
    if len(names) != len(train_set.names):
        raise DatasetError(f"{len(names)} class names given for {len(train_set.names)} dataset classes "
                           f"({train_set.names}): give one per class, in class-id order.")
    source = Path(train_set.source)
    if checked is not None and val_data is None:
        if classes:
            checked["names"] = dict(enumerate(names))
        out.mkdir(parents=True, exist_ok=True)
        derived = out / "data.yaml"
        derived.write_text(yaml.safe_dump(checked, sort_keys=False))
        return derived, names
    if source.suffix in (".yaml", ".yml") and val_data is None:
        if not classes:
            return source, names
        raw = yaml.safe_load(source.read_text())
        root = Path(raw.get("path") or source.parent)
        raw["path"] = str((root if root.is_absolute() else source.parent / root).resolve())
        raw["names"] = dict(enumerate(names))
        raw.pop("download", None)
        out.mkdir(parents=True, exist_ok=True)
        derived = out / "data.yaml"
        derived.write_text(yaml.safe_dump(raw, sort_keys=False))
        return derived, names
    if source.suffix in (".yaml", ".yml"):
        raise DatasetError("A separate validation set is only supported for COCO input; a YOLO data.yaml already "
                           "names its val split.")
    val_set = load_dataset(val_data) if val_data is not None else train_set
    if val_set.names != train_set.names:
        raise DatasetError(f"Train and val datasets have different classes: {train_set.names} vs {val_set.names}.")
    root = out / "data"
    if root.exists():
        shutil.rmtree(root)
    _write_yolo_copy(train_set, root / "train")
    _write_yolo_copy(val_set, root / "val")
    derived = root / "data.yaml"
    derived.write_text(yaml.safe_dump({"path": str(root.resolve()), "train": "train/images", "val": "val/images",
                                       "names": dict(enumerate(names))}, sort_keys=False))
    return derived, names


def _is_default_text_model(text_model: Any) -> bool:
    from ovdet.weights.registry import DEFAULT_TEXT_MODEL, lookup

    if text_model is None:
        return True
    spec = lookup(str(text_model)) if isinstance(text_model, str) else None
    return spec is not None and spec.name == DEFAULT_TEXT_MODEL


def _start_model(model: str | Path, trust_weights: bool = False) -> tuple[str, dict | None]:
    """What ultralytics should build from (yaml config or resolved .pt) and the text tower that .pt carries.

    Its model config is checked here, before anything else is loaded (the trainer checks it again when it builds)."""
    text = str(model)
    if text.endswith((".yaml", ".yml")):
        if not trust_weights:
            read_model_yaml(text, CONFIG_TRUST_HINT)
        return text, None
    from ovdet.weights.registry import resolve_detector

    path = resolve_detector(model)
    weights, ckpt = load_world_checkpoint(path, trust_weights=trust_weights)
    if not trust_weights:
        check_model_config(weights.yaml, str(path), TRUST_HINT)
    return str(path), ckpt.get(TEXT_ENCODER_KEY)


def _half_state(state: dict) -> dict:
    """The text tower's state with floating tensors stored as fp16 (half the bytes in the checkpoint)."""
    out = dict(state)
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    return out


@contextmanager
def _ultralytics_output(quiet: bool) -> Iterator[None]:
    """ultralytics' own training output: nothing when `quiet`; in a log (stdout not a terminal) one plain line per
    progress bar when it ends instead of carriage-return redraw frames (its GitHub Actions mode)."""
    from ultralytics.utils import LOGGER
    from ultralytics.utils import tqdm as ul_tqdm

    level, check = LOGGER.level, ul_tqdm.is_noninteractive_console
    try:
        if quiet:
            LOGGER.setLevel(logging.WARNING)  # its progress bars turn themselves off with the info messages
        if not sys.stdout.isatty():
            ul_tqdm.is_noninteractive_console = lambda: True
        yield
    finally:
        LOGGER.setLevel(level)
        ul_tqdm.is_noninteractive_console = check


def train(data: str | Path, model: str | Path = "yolov8s-worldv2", out: str | Path = "runs/ovdet-train",
          epochs: int = 10, imgsz: int = 640, batch: int = 16, device: str | torch.device = "auto",
          text_model: str | Path | TextEncoder | None = None, classes: Sequence[str] | None = None,
          val_data: str | Path | None = None, overwrite: bool = False, quiet: bool = False,
          trust_weights: bool = False, trust_data: bool = False, **overrides: Any) -> TrainResult:
    """Train a YOLO-World detector on a YOLO or COCO dataset; writes OUT/model.pt and returns its metrics.

    `model` is a detector name or .pt (fine-tune) or an ultralytics yaml config (from scratch). Class texts are
    encoded by `text_model` (default: the tower inside the starting checkpoint, else CLIP ViT-B/32); a tower other
    than the default is stored in the checkpoint (fp16) under "ovdet_text_encoder", and training uses exactly
    those stored weights. `overrides` are further ultralytics training arguments (lr0=..., mosaic=..., ...).
    `quiet` silences ultralytics' output; when stdout is not a terminal its progress bars print plain lines.
    Checkpoints and model configs are read without running code from them unless `trust_weights`, and a data.yaml
    is checked as data (no `download`, splits inside the dataset) unless `trust_data` (only for files you trust).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"Output folder {out} is not empty: choose a new one or pass overwrite=True "
                           "(--overwrite).")
    if epochs < 1:
        raise DatasetError(f"epochs must be at least 1, got {epochs}.")
    if overrides.get("resume") and not trust_weights:
        raise WeightsUnsafeError(f"resume={overrides['resume']!r} makes ultralytics read its last.pt with plain "
                                 f"pickle, which can run code from the file. {TRUST_HINT}")
    start, carried = _start_model(model, trust_weights)
    _checked_data_yaml(data, trust_data)  # fail before the text tower loads; prepare_data checks it again
    if isinstance(text_model, TextEncoder):
        encoder, embed = text_model, True
    elif text_model is None and carried is not None:
        encoder, embed = TextEncoder.from_state(carried), True
    else:
        from ovdet.weights.registry import resolve_text_model

        encoder = TextEncoder.load(resolve_text_model(text_model))
        embed = not _is_default_text_model(text_model)
    text_state = None
    if embed:  # train with the very weights the checkpoint will hold
        text_state = _half_state(encoder.to_state())
        encoder = TextEncoder.from_state(text_state)
    dev = _ultralytics_device(device)
    encoder.to(select_device(device))
    data_yaml, names = prepare_data(data, out, classes, val_data, trust_data=trust_data)
    args = {"plots": False, "workers": 2, **overrides, "model": start, "data": str(data_yaml), "epochs": epochs,
            "imgsz": imgsz, "batch": batch, "device": dev, "project": str(out.resolve().parent), "name": out.name,
            "exist_ok": True, "val": True}
    t0 = time.time()
    with _ultralytics_output(quiet):
        trainer = OVDetWorldTrainer(encoder, overrides=args, trust_weights=trust_weights)
        trainer.train()
    seconds = time.time() - t0
    best = trainer.best if trainer.best.exists() else trainer.last
    ckpt = load_checkpoint(best, trust=trust_weights)
    if text_state is not None:
        ckpt[TEXT_ENCODER_KEY] = text_state
    checkpoint = out / "model.pt"
    torch.save(ckpt, checkpoint)
    metrics = {k: float(trainer.metrics.get(v, float("nan"))) for k, v in METRIC_KEYS.items()}
    return TrainResult(checkpoint=checkpoint, metrics=metrics, epochs=epochs, seconds=seconds)
