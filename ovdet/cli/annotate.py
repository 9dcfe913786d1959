"""`ovdet annotate SRC --classes ... --out DIR`: pseudo-label a folder of images into datasets, resumably."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ovdet.cli import HelpFormatter
from ovdet.cli._common import (add_classes_option, add_model_options, add_tile_options, announce, build_detector,
                               class_input, detector_config, tile_options)
from ovdet.util.display import shown
from ovdet.errors import DatasetError
from ovdet.options import DATASET_FORMATS as FORMATS

if TYPE_CHECKING:
    from ovdet.engines.ray import RayEngine


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "annotate", help="label a folder of images into COCO / YOLO / VOC / JSONL datasets",
        description="Detect the named classes in every image of a folder and write training-ready datasets. "
                    "Unreadable files are listed in OUT/errors.jsonl and skipped. An interrupted run resumes "
                    "where it stopped when started again with the same command.",
        formatter_class=HelpFormatter)
    p.add_argument("src", metavar="SRC", help="folder of images (jpg, jpeg, png, bmp, webp, tif, tiff); with --engine ray "
                                           "also a URI: file://, s3://, gs://, abfs://, hdfs://")
    add_classes_option(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not be inside SRC)")
    p.add_argument("--format", default=",".join(FORMATS), metavar="FMT[,FMT...]",
                   help=f"datasets to write, comma-separated, from {', '.join(FORMATS)} "
                        "(predictions.jsonl is always written: resuming relies on it)")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--save-annotated", action="store_true", help="also write preview JPEGs with boxes to OUT/annotated")
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="include images in subfolders")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the outputs of an earlier run in OUT and start over (needed to change settings)")
    p.add_argument("--report", action="store_true",
                   help="also write OUT/report.html to review the boxes and pick per-class thresholds "
                        "(see `ovdet report --help`)")
    p.add_argument("--val-split", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of the images (e.g. 0.2) as the val split of the YOLO and COCO "
                        "outputs, chosen by a hash of each image's path: the same on every re-run and resume. "
                        "With 0, data.yaml's val is the training set (a comment in it says so)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the --val-split hash (another seed, "
                                                                  "another split)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (or progress lines) and no summary line")
    add_model_options(p)
    calib = next(a for a in p._actions if a.dest == "calib")
    calib.help = "folder of images to calibrate int8 on (default: the folder being annotated)"
    add_tile_options(p)
    ray = p.add_argument_group("engine")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: threads in this process; ray: a Ray Data actor pool over a cluster (needs "
                          '`pip install "ovdet[ray]"`; same outputs, and either engine resumes the other\'s run)')
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="Ray cluster to join, e.g. 10.0.0.5:6379, ray://head:10001, or auto for the one `ray start` "
                          "runs on this machine (default: RAY_ADDRESS if set, else a Ray instance of this run's own "
                          "on this machine, stopped after it; a cluster already running here is not joined)")
    ray.add_argument("--workers", type=int, default=None, metavar="N",
                     help="detector workers (Ray actors), each with its own copy of the model (default: one per "
                          "node, holding all of its CPUs; with --gpus-per-worker, as many as the GPUs allow)")
    ray.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                     help="CPUs each worker reserves; also its torch threads (default: a node's CPUs, split between "
                          "--workers if given; 1 with --gpus-per-worker)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                     help="GPUs each worker reserves (1: one model per GPU; 0.5: two per GPU); --device auto then "
                          "runs it on CUDA")
    return p


def run(args: argparse.Namespace) -> int:
    engine: str | RayEngine = "local"
    if args.engine == "ray":  # the workers run the model options; the driver encodes the classes on its CPU
        from ovdet.engines.ray import RayEngine

        engine = RayEngine(address=args.ray_address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker)
        if not args.quiet:  # the backend line of a Ray run: the workers choose, the summary says what ran
            print(f"ovdet: {shown(str(args.model))} on the Ray workers (--backend {args.backend or 'auto'}, "
                  f"--precision {args.precision or 'auto'}: each worker resolves auto on its own machine)",
                  file=sys.stderr)
    elif args.workers is not None or args.ray_address is not None:
        raise DatasetError("--workers and --ray-address are options of --engine ray; add --engine ray to use them")
    if args.precision == "int8" and args.calib is None and "://" not in str(args.src):
        args.calib = args.src  # int8 calibrates on the images it is about to annotate
    from ovdet.jobs.annotate import annotate_folder

    summary = annotate_folder(
        args.src, class_input(args), args.out, formats=args.format, config=detector_config(args),
        detector=None if args.engine == "ray" else lambda: announce(build_detector(args), args.quiet),
        batch=args.batch,
        save_annotated=args.save_annotated, recursive=args.recursive, overwrite=args.overwrite, quiet=args.quiet,
        val_split=args.val_split, split_seed=args.split_seed, engine=engine, tile=tile_options(args),
    )
    if not args.quiet:
        print(summary.line(), file=sys.stderr)
    if args.report:
        from ovdet.report import write_report

        path = write_report(args.out, quiet=args.quiet)
        if not args.quiet:
            print(f"report -> {shown(path)}", file=sys.stderr)
    return 0
