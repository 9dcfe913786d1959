"""`ovdet detect IMAGE...`: detect in images, print the boxes, optionally save annotated copies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ovdet.cli import HelpFormatter
from ovdet.cli._common import (add_classes_option, add_model_options, add_tile_options, announce, build_detector,
                               tile_options)
from ovdet.util.display import json_shown, shown
from ovdet.errors import DatasetError, ImageError


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("detect", help="detect named classes in images",
                            description="Detect the named classes in each image and print the boxes.",
                            formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_classes_option(parser)
    add_model_options(parser)
    add_tile_options(parser)
    parser.add_argument("--save", metavar="DIR", default=None,
                        help="write annotated copies of the images here, each under its input's file name")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    return parser


def run(args: argparse.Namespace) -> int:
    import cv2

    from ovdet.masks.rle import encode
    from ovdet.media.draw import draw
    from ovdet.media.sources import load_image

    saved_as = _saved_names(args.images) if args.save else {}
    det = build_detector(args)
    tiling = {"tile": tile_options(args)} if args.tile is not None else {}
    announce(det)
    failed = saved = 0
    for path in args.images:
        try:
            # tiled: the path itself, so a huge file is read in strips instead of decoded whole
            image = None if tiling and not args.save else load_image(path)
            dets = det.detect(path if image is None else image, **tiling)
        except ImageError as exc:
            failed += 1
            print(f"ovdet: skipped {shown(path)}: {shown(exc)}", file=sys.stderr)
            continue
        masks = [None] * len(dets) if dets.mask is None else dets.mask  # with --masks: an RLE each in --json
        rows = [{"class": str(n), "score": round(float(s), 4), "xyxy": [round(float(v), 1) for v in box],
                 **({} if m is None else {"segmentation": encode(m)})}
                for n, s, box, m in zip(dets.data["class_name"], dets.confidence, dets.xyxy, masks)]
        if args.json:
            print(json_shown(json.dumps({"image": str(path), "detections": rows}, ensure_ascii=False)))
        else:
            print(f"{shown(path)}: {len(rows)} detection{'s' if len(rows) != 1 else ''}")
            for r in rows:  # file and class names are shown with control characters escaped
                print(f"  {shown(r['class']):<20} {r['score']:.2f}  " + " ".join(f"{v:.1f}" for v in r["xyxy"]))
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(out / saved_as[path]), draw(image, dets)):
                raise DatasetError(f"Could not write {shown(out / saved_as[path])}: check that {shown(out)} is a "
                                   "writable folder with free space.")
            saved += 1
    if args.save:
        print(f"ovdet: saved {saved} annotated image{'s' if saved != 1 else ''} to {shown(args.save)}",
              file=sys.stderr)
    return 1 if failed else 0


# the suffixes OpenCV writes; an input of another kind (e.g. .gif) is saved as .png
_WRITABLE = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _saved_names(images: list[str]) -> dict[str, str]:
    """Each input's file name in the --save folder: its own name (and suffix, when OpenCV can write it). Two inputs
    with one name would overwrite each other, so that is refused before anything runs."""
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for path in images:
        p = Path(path)
        name = p.name if p.suffix.lower() in _WRITABLE else p.stem + ".png"
        if name.lower() in taken and taken[name.lower()] != path:
            raise DatasetError(f"{shown(taken[name.lower()])} and {shown(path)} would both be saved as {shown(name)}: "
                               "detect them in separate runs with separate --save folders, or rename one.")
        taken[name.lower()] = path
        names[path] = name
    return names
