"""`ovdet webcam`: live detection on a camera or stream, in a window (or headless), with recording."""

from __future__ import annotations

import argparse
import sys

from ovdet.cli import HelpFormatter
from ovdet.cli._common import add_classes_option, add_model_options, announce, backend_words, build_detector
from ovdet.options import LIVE_KEYS_HELP as HELP
from ovdet.util.display import shown


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("webcam", help="live detection on a camera or stream",
                            description=f"Live open-vocabulary detection in a window. {HELP}.",
                            formatter_class=HelpFormatter)
    parser.add_argument("--source", default="0",
                        help="camera index, RTSP/HTTP URL, or a video file played as if live")
    add_classes_option(parser)
    parser.add_argument("--record", default=None,
                        help="record the annotated video to this .mp4 from the start (r toggles recording)")
    parser.add_argument("--out-dir", default=".", help="folder for snapshots and recordings when --record is not given")
    parser.add_argument("--no-window", action="store_true", help="headless: print detections, no window (Ctrl-C stops)")
    parser.add_argument("--track", action="store_true", help="persistent ids with ByteTrack")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds without a frame before the source counts as stalled")
    add_model_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ovdet.video.live import run_live

    det = announce(build_detector(args))
    report = run_live(det, args.source, window=not args.no_window, record=args.record, out_dir=args.out_dir,
                      track=args.track, read_timeout=args.timeout, data=print,  # detections: stdout
                      echo=lambda line: print(line, file=sys.stderr))  # messages and prompts: stderr
    rate = report.frames / report.seconds if report.seconds > 0 else 0.0
    print(f"{report.frames} frames in {report.seconds:.1f} s ({rate:.1f} frames/s, {backend_words(det)}), "
          f"{report.dropped} dropped", file=sys.stderr)  # stdout is data here: headless, one line per frame
    for path in report.recordings:
        print(f"recorded {shown(path)}", file=sys.stderr)
    return 0
