"""`ovdet video INPUT`: detect (and track) in every frame of a video; write an annotated video and/or JSONL."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovdet.cli import HelpFormatter
from ovdet.cli._common import (add_classes_option, add_model_options, add_tile_options, announce, backend_words,
                               build_detector, tile_options)
from ovdet.util.display import shown


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("video", help="detect named classes in a video file",
                            description="Detect the named classes in every frame of a video (or stream URL); "
                                        "write an annotated video with the input's size and fps, and/or one "
                                        "JSON line per frame.",
                            formatter_class=HelpFormatter)
    parser.add_argument("input", metavar="INPUT", help="video file (or RTSP/HTTP URL)")
    add_classes_option(parser)
    parser.add_argument("--out", default=None,
                        help="annotated output video (.mp4); default INPUT_STEM_ovdet.mp4 here unless only "
                             "--jsonl is given")
    parser.add_argument("--jsonl", default=None,
                        help="write one JSON line per frame: frame index, time (s), detections with track ids")
    parser.add_argument("--track", action="store_true", help="persistent ids with ByteTrack (in labels and JSONL)")
    parser.add_argument("--traces", action="store_true", help="draw the recent path of each track (implies --track)")
    parser.add_argument("--batch", type=int, default=4, help="frames per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (or progress lines)")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but errors: no progress and no summary")
    add_model_options(parser)
    add_tile_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ovdet.video.job import process_video

    out = args.out
    if out is None and args.jsonl is None:
        out = f"{Path(args.input).stem}_ovdet.mp4"
    det = announce(build_detector(args), args.quiet)
    report = process_video(det, args.input, out, args.jsonl, track=args.track, traces=args.traces,
                           batch=args.batch, progress=not (args.no_progress or args.quiet),
                           **({"tile": tile_options(args)} if args.tile is not None else {}))
    if args.quiet:
        return 0
    print(f"{report.frames} frames in {report.seconds:.1f} s ({report.fps:.1f} frames/s, {backend_words(det)})",
          file=sys.stderr)
    for path in (report.out, report.jsonl):
        if path is not None:
            print(f"wrote {shown(path)}", file=sys.stderr)
    return 0
