"""`ovdet train DATA`: fine-tune a YOLO-World detector on a labelled YOLO or COCO dataset."""

from __future__ import annotations

import argparse

from ovdet.cli import HelpFormatter
from ovdet.cli._common import add_trust_option
from ovdet.errors import DatasetError


def _setting(text: str) -> tuple[str, object]:
    import yaml
    from ultralytics.utils import DEFAULT_CFG_DICT

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an ultralytics training argument), got {text!r}")
    if key not in DEFAULT_CFG_DICT:
        raise argparse.ArgumentTypeError(f"{key!r} is not an ultralytics training argument (e.g. lr0, mosaic, "
                                         "hsv_h, patience, optimizer)")
    return key, yaml.safe_load(value)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a YOLO-World detector on a labelled dataset",
                       description="Train a YOLO-World detector with ultralytics' trainer on a YOLO (data.yaml) or "
                                   "COCO (.json) dataset, with class names encoded by ovdet's text tower. Writes "
                                   "OUT/model.pt, which `--model OUT/model.pt` loads in every ovdet command.",
                       formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DATA", help="YOLO data.yaml, COCO annotations .json, or a folder holding one")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes-from-data", action="store_true",
                       help="use the dataset's class names as the prompts to train with")
    names.add_argument("--classes", default=None,
                       help="prompts to train with, comma-separated, one per dataset class in class-id order")
    p.add_argument("--model", default="yolov8s-worldv2",
                   help="start from: a detector name or .pt (fine-tune), or an ultralytics yaml config (scratch)")
    p.add_argument("--text-model", default=None,
                   help="text tower: HF id, folder or OpenAI ViT-B-32.pt (default: the one in the starting "
                        "checkpoint, else CLIP ViT-B/32); a non-default tower is stored in the checkpoint")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--imgsz", type=int, default=640, help="training image size in pixels (multiple of 32)")
    p.add_argument("--batch", type=int, default=16, help="images per training batch")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default="runs/ovdet-train", help="output folder: model.pt, results.csv, weights/")
    p.add_argument("--val-data", default=None, help="COCO .json to validate on (YOLO data.yaml has its own val)")
    p.add_argument("--seed", type=int, default=0, help="random seed of ultralytics' trainer")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (ultralytics uses 0 on CPU)")
    p.add_argument("--overwrite", action="store_true", help="train into a non-empty output folder")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but warnings and errors (ultralytics' progress and the final metrics line); "
                        "without it, output to a log or pipe has one plain line per progress bar, no redraw frames")
    add_trust_option(p)
    p.add_argument("--trust-data", action="store_true",
                   help="hand a YOLO data.yaml to ultralytics as is: without it ovdet refuses a `download` field "
                        "(ultralytics runs it as Python or shell, or fetches it, when a split is missing) and splits "
                        "outside the dataset folder; only for data.yaml files you trust (see README, Security)")
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any other ultralytics training argument, e.g. --set lr0=0.002 --set mosaic=0.5 (repeatable)")
    return p


def run(args: argparse.Namespace) -> int:
    from ovdet.detector import parse_class_names
    from ovdet.jobs.train import train  # ultralytics' trainer: imported only when training

    classes = parse_class_names(args.classes) if args.classes else None
    overrides = dict(args.settings)
    clash = sorted(set(overrides) & {"model", "data", "epochs", "imgsz", "batch", "device", "project", "name"})
    if clash:
        raise DatasetError(f"--set {', '.join(clash)}: use the dedicated option(s) instead.")
    result = train(args.data, model=args.model, out=args.out, epochs=args.epochs, imgsz=args.imgsz,
                   batch=args.batch, device=args.device, text_model=args.text_model, classes=classes,
                   val_data=args.val_data, overwrite=args.overwrite, seed=args.seed, workers=args.workers,
                   quiet=args.quiet, trust_weights=args.trust_weights, trust_data=args.trust_data,
                   **overrides)
    if args.quiet:
        return 0
    m = result.metrics
    print(f"ovdet train: {result.epochs} epochs in {result.seconds:.0f}s; best on val: mAP50 {m['mAP50']:.3f} "
          f"mAP50-95 {m['mAP50-95']:.3f} precision {m['precision']:.3f} recall {m['recall']:.3f} "
          f"-> {result.checkpoint}")
    return 0
