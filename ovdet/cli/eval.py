"""`ovdet eval DATA`: mAP50 and mAP50-95 of a detector on a labelled YOLO or COCO dataset."""

from __future__ import annotations

import argparse
import json

from ovdet.cli import HelpFormatter
from ovdet.cli._common import (add_exemplar_options, add_model_options, add_tile_options, announce, backend_words,
                               detector_from_args, tile_options)
from ovdet.errors import DatasetError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score a detector on a labelled dataset (mAP50, mAP50-95)",
                       description="Run the detector over a labelled YOLO (data.yaml) or COCO (.json) dataset and "
                                   "print COCO-style mAP50 and mAP50-95, overall and per class. Dataset class names "
                                   "are used as prompts unless --map says otherwise.",
                       formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DATA", help="YOLO data.yaml, COCO annotations .json, or a folder holding one")
    p.add_argument("--split", default="val", help="split of a YOLO data.yaml to score (train, val or test)")
    p.add_argument("--classes", default=None,
                   help="prompts to give the detector, comma-separated (default: the dataset's class names after "
                        "--map); dataset classes whose prompt is not listed are left out of the score")
    p.add_argument("--map", default=None, metavar="NAME=PROMPT,...",
                   help='prompt for a dataset class, e.g. "person=a pedestrian,car=a car"')
    add_exemplar_options(p)
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar (or progress lines); the result is printed")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="save the run (settings, scores, every image's predictions and ground truth) in this folder; "
                        "an earlier eval run there is replaced")
    p.add_argument("--report", action="store_true",
                   help="also write DIR/report.html: PR curves, AP table, confusion matrix and the images with the "
                        "most false positives / misses, ground truth and predictions drawn in two colours "
                        "(needs --out)")
    add_model_options(p)
    add_tile_options(p)
    p.set_defaults(conf=0.001)  # mAP integrates over all confidences: keep low-scoring boxes
    return p


def run(args: argparse.Namespace) -> int:
    if args.report and not args.out:
        raise DatasetError("--report needs --out DIR: the folder the run and its report are saved in")
    from ovdet.detector import parse_class_names
    from ovdet.jobs.evaluate import evaluate, load_dataset, parse_mapping
    from ovdet.text.exemplars import parse_exemplar

    dataset = load_dataset(args.data, split=args.split)
    mapping = parse_mapping(args.map, dataset.names)
    classes = parse_class_names(args.classes) if args.classes else None
    exemplars = [parse_exemplar(text, source=args.exemplar_source) for text in args.exemplar]
    det = announce(detector_from_args(args), args.quiet)
    result = evaluate(det, dataset, classes=classes, mapping=mapping, exemplars=exemplars, conf=args.conf, iou=args.iou,
                      batch=args.batch, progress=not args.quiet, out=args.out, tile=tile_options(args))
    if args.json:
        print(json.dumps({"data": dataset.source, "split": args.split, "model": det.model_id, "backend": det.backend,
                          "precision": det.precision, **result.to_dict()}))
    else:
        print(result.table())
        print(f"mAP50 {result.map50:.3f}  mAP50-95 {result.map50_95:.3f}  ({result.images} images, "
              f"{result.instances} instances, model {det.model_id}, {backend_words(det)})")
        if result.skipped:
            print(f"skipped {len(result.skipped)} unreadable image(s)")
    if args.report:
        from ovdet.report import write_report

        path = write_report(args.out, quiet=args.json or args.quiet)
        if not args.json:
            print(f"report -> {path}")
    return 0
