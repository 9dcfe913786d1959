"""`ovdet export MODEL`: write the detector as ONNX, OpenVINO IR or a TensorRT engine for other runtimes."""

from __future__ import annotations

import argparse

from ovdet.cli import HelpFormatter
from ovdet.cli._common import add_trust_option
from ovdet.options import EXPORT_FORMATS as FORMATS
from ovdet.options import EXPORT_PRECISIONS as PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export the detector to ONNX, OpenVINO or TensorRT",
                       description="With --classes: a file with that vocabulary baked in, written by ultralytics' own "
                                   "exporter, which ultralytics' YOLO(path).predict(image) runs unchanged (class "
                                   "names in its metadata). Without: the live-vocabulary graph, whose inputs are the "
                                   "images and the text embeddings, so any runtime can change classes without "
                                   "exporting again (inputs and outputs: see the README, Export).",
                       formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", default="yolov8s-worldv2",
                   help="detector: a name from `ovdet weights list`, a .pt file, or an ultralytics yaml config")
    p.add_argument("--format", default="onnx", choices=tuple(FORMATS),
                   help="onnx (a .onnx file), openvino (a NAME_openvino_model folder) or engine (TensorRT, built on "
                        "this machine's NVIDIA GPU)")
    p.add_argument("--classes", default=None,
                   help='bake this vocabulary in: comma-separated names, e.g. "person,bus,red backpack", or a class '
                        "file (templates allowed; synonyms, negatives and per-class thresholds need the live graph)")
    p.add_argument("--precision", default="fp32", choices=(*PRECISIONS, "bf16"),
                   help="fp32, fp16 (weights in half precision; a GPU runs them in fp16) or int8 (post-training "
                        "quantization on the --calib images); bf16 is a runtime setting, not a file format")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="calibration images for int8 (default: the sample images shipped with ovdet)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="input size, a multiple of 32 (default: the size the model was trained at)")
    p.add_argument("--dynamic", action="store_true",
                   help="baked export with dynamic batch and height x width (the live graph is always dynamic)")
    p.add_argument("--batch", type=int, default=1, help="batch size of a static export (the largest for an engine)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="where to write: NAME.onnx, NAME_openvino_model or NAME.engine (default: the model's name "
                        "in the current folder)")
    p.add_argument("--text-model", default=None,
                   help="text tower that encodes --classes (default: the one in the checkpoint, else CLIP ViT-B/32)")
    add_trust_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ovdet.jobs.export import export_model

    result = export_model(args.model, args.format, classes=args.classes, out=args.out, precision=args.precision,
                          imgsz=args.imgsz, calib=args.calib, text_model=args.text_model,
                          trust_weights=args.trust_weights, batch=args.batch, dynamic=args.dynamic)
    what = (f"{len(result.classes)} classes baked in" if result.classes is not None
            else "live vocabulary (inputs: images, txt_feats)")
    print(f"exported {result.path} ({result.format}, {result.precision}, imgsz {result.imgsz}, {what}) "
          f"in {result.seconds:.1f} s")
    if result.classes is not None:
        print(f'run it with ultralytics: YOLO("{result.path}").predict("image.jpg")')
    return 0
