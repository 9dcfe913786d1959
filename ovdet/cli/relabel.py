"""`ovdet relabel RUN_DIR --conf "a=0.4" --out NEW_DIR`: re-derive a run's datasets at new thresholds, no model."""

from __future__ import annotations

import argparse
import sys

from ovdet.cli import HelpFormatter
from ovdet.options import DATASET_FORMATS as FORMATS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "relabel", help="re-derive a run's datasets at new per-class thresholds (no model, no inference)",
        description="Write the COCO / YOLO / VOC / JSONL datasets of an `ovdet annotate` run again from its "
                    "predictions.jsonl, keeping the boxes above new per-class thresholds, optionally dropping, "
                    "renaming or merging classes and dropping small boxes. Thresholds can only go up from the "
                    "run's own: lower-scoring boxes were never saved. `ovdet report RUN_DIR` lets you pick them "
                    "by eye and copies this command.",
        formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of an `ovdet annotate` (or relabel) run")
    p.add_argument("--out", required=True, metavar="NEW_DIR", help="folder for the new datasets (new or empty)")
    p.add_argument("--conf", default=None, metavar="CLASS=T,...",
                   help='per-class thresholds, e.g. "person=0.4,helmet=0.2" (run class names); a box is kept '
                        "when its score is above its class's threshold")
    p.add_argument("--default-conf", type=float, default=None, metavar="T",
                   help="threshold of the classes --conf does not name (default: the run's own per class)")
    p.add_argument("--drop-class", default=None, metavar="CLASS,...", help="classes to remove, comma-separated")
    p.add_argument("--rename", default=None, metavar="OLD=NEW,...",
                   help='rename classes, e.g. "automobile=car"; two classes renamed to one name merge')
    p.add_argument("--min-area", type=float, default=0.0, metavar="PX2",
                   help="drop boxes smaller than this area in image pixels² (0 keeps all)")
    p.add_argument("--format", default=None, metavar="FMT[,FMT...]",
                   help=f"datasets to write, from {', '.join(FORMATS)} (default: the run's own formats; "
                        "predictions.jsonl is always written)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in NEW_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def run(args: argparse.Namespace) -> int:
    from ovdet.jobs.relabel import relabel_run

    summary = relabel_run(args.run_dir, args.out, conf=args.conf, default_conf=args.default_conf,
                          drop=args.drop_class or (), rename=args.rename, min_area=args.min_area, formats=args.format,
                          overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        print(summary.line(), file=sys.stderr)
    return 0
