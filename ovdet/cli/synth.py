"""`ovdet synth OUT`: generate a seeded YOLO dataset of coloured shapes on cluttered backgrounds."""

from __future__ import annotations

import argparse

from ovdet.cli import HelpFormatter
from ovdet.errors import DatasetError
from ovdet.options import SYNTH_DEFAULT_COLOURS as DEFAULT_COLOURS
from ovdet.options import SYNTH_DEFAULT_SHAPES as DEFAULT_SHAPES
from ovdet.options import SYNTH_PALETTE as PALETTE
from ovdet.options import SYNTH_SHAPES as SHAPES


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("synth", help="generate a seeded dataset of coloured shapes (YOLO format)",
                       description="Generate a seeded YOLO dataset (images/, labels/, data.yaml) of coloured shapes "
                                   "such as 'red circle' and 'blue square' on cluttered backgrounds.",
                       formatter_class=HelpFormatter)
    p.add_argument("out", help="output folder (must be new or empty)")
    p.add_argument("--train", type=int, default=512, help="number of training images")
    p.add_argument("--val", type=int, default=128, help="number of validation images")
    p.add_argument("--imgsz", type=int, default=160, help="image side in pixels (images are square)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--colours", default=",".join(DEFAULT_COLOURS),
                   help=f"comma-separated object colours, from: {','.join(PALETTE)}")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"comma-separated object shapes, from: {','.join(SHAPES)}")
    p.add_argument("--min-objects", type=int, default=2, help="fewest objects per image")
    p.add_argument("--max-objects", type=int, default=6, help="most objects per image")
    p.add_argument("--canvas", default=None, metavar="WxH",
                   help="large images of WxH pixels (e.g. 4000x3000) whose clutter looks locally like an --imgsz "
                        "image; --min/--max-objects count per canvas. A world for sliced inference (--tile)")
    p.add_argument("--object-size", default=None, metavar="MIN,MAX",
                   help="object side in pixels, e.g. 16,40 (default: 9%%-32%% of --imgsz)")
    p.add_argument("--masks", action="store_true",
                   help="write each object's exact instance mask: the labels become YOLO segment lines (polygons), "
                        "to train a -seg model or measure masks (benchmarks/bench_masks.py)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary line")
    return p


def _pair(text: str | None, sep: str, option: str, example: str) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split(sep)
    try:
        first, second = (int(v) for v in parts)
    except ValueError:
        raise DatasetError(f"{option} takes two whole numbers like {example}, got {text!r}") from None
    return first, second


def run(args: argparse.Namespace) -> int:
    from ovdet.jobs.synth import WorldSpec, generate

    spec = WorldSpec(colours=tuple(_words(args.colours)), shapes=tuple(_words(args.shapes)), imgsz=args.imgsz,
                     objects=(args.min_objects, args.max_objects),
                     canvas=_pair(args.canvas, "x", "--canvas", "4000x3000"),
                     object_px=_pair(args.object_size, ",", "--object-size", "16,40"))
    path = generate(args.out, train=args.train, val=args.val, seed=args.seed, spec=spec, progress=not args.quiet,
                    masks=args.masks)
    if args.quiet:
        return 0
    size = "x".join(map(str, spec.shape))
    print(f"wrote {args.train} train + {args.val} val images ({size}), {len(spec.names)} classes "
          f"({', '.join(spec.names)}){', with instance masks' if args.masks else ''} -> {path}")
    return 0
