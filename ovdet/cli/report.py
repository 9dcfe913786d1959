"""`ovdet report RUN_DIR`: write RUN_DIR/report.html, a self-contained page to review a run and pick thresholds."""

from __future__ import annotations

import argparse
import sys

from ovdet.cli import HelpFormatter


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report", help="write an HTML review page of an annotate, relabel or eval run",
        description="Write RUN_DIR/report.html: one self-contained page (no network) with the run's settings and "
                    "counts, per-class score histograms, a gallery with boxes drawn live at per-class threshold "
                    "sliders, sorting by the most uncertain images, a button that copies the matching "
                    "`ovdet relabel` command, and for eval runs PR curves, AP, a confusion matrix and the images "
                    "with the most false positives or misses. Thumbnails are written once to RUN_DIR/thumbs/.",
        formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `ovdet annotate`, `relabel` or `eval`")
    p.add_argument("--no-thumbs", dest="thumbs", action="store_false",
                   help="show the full images in the gallery instead of writing thumbnails (small runs; by default "
                        "thumbnails are written)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def run(args: argparse.Namespace) -> int:
    from ovdet.report import write_report

    path = write_report(args.run_dir, thumbnails=args.thumbs, quiet=args.quiet)
    if not args.quiet:
        print(f"report -> {path} (open it in a browser; it needs no network)", file=sys.stderr)
    return 0
