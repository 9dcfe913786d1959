"""Options shared by the commands that run a detector."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ovdet.config import DetectorConfig
from ovdet.masks.names import SEGMENTERS
from ovdet.options import BACKEND_ENV, BACKENDS, PRECISION_CHOICES
from ovdet.util.display import shown

if TYPE_CHECKING:  # the detector (torch, ultralytics, transformers) is imported when a command runs, not for --help
    from ovdet.detector import OVDetector
    from ovdet.tiling import TileSpec


_DEFAULTS = DetectorConfig()


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --text-model, --device, --half, --backend, --precision, --calib, --threads, --imgsz, --conf, --iou,
    --max-det, --masks, --trust-weights: one per DetectorConfig field, with its default (read back by
    detector_config)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=_DEFAULTS.model,
                       help="detector: a name from `ovdet weights list`, a .pt file, or an ultralytics yaml config")
    group.add_argument("--text-model", default=_DEFAULTS.text_model,
                       help="text tower: Hugging Face id, folder or OpenAI ViT-B-32.pt (default: the one in the "
                            "checkpoint, else CLIP ViT-B/32)")
    group.add_argument("--device", default=_DEFAULTS.device,
                       help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    group.add_argument("--half", action=argparse.BooleanOptionalAction, default=_DEFAULTS.half,
                       help="fp16 inference (default: on for CUDA, off otherwise)")
    group.add_argument("--backend", choices=BACKENDS, default=_DEFAULTS.backend,
                       help="what runs the model: auto (OpenVINO on a CPU, TensorRT on CUDA, when installed; else "
                            f"torch; ${BACKEND_ENV} overrides auto), torch, openvino, onnxruntime, tensorrt. The "
                            "vocabulary stays live on every backend; see README, Backends")
    group.add_argument("--precision", choices=PRECISION_CHOICES, default=_DEFAULTS.precision,
                       help="auto (the default: bf16 with openvino on CPUs with native bf16, fp16 with torch / "
                            "tensorrt on CUDA, else fp32); fp32 (exact); bf16 (openvino, CPUs with bf16); fp16 (GPU); "
                            "int8 (openvino, calibrated on --calib images)")
    group.add_argument("--calib", default=_DEFAULTS.calib, metavar="DIR",
                       help="folder of images to calibrate int8 on, like the ones you will detect in (default: the "
                            "samples shipped with ovdet, else ultralytics' sample photos)")
    group.add_argument("--threads", type=int, default=_DEFAULTS.threads, metavar="N",
                       help="CPU threads of the backend (default: torch's thread count)")
    group.add_argument("--imgsz", type=int, default=_DEFAULTS.imgsz,
                       help="inference size in pixels, a multiple of 32 (default: the size the model was trained "
                            "at, 640 for the published YOLO-World models)")
    group.add_argument("--conf", type=float, default=_DEFAULTS.conf, help="minimum confidence of a detection")
    group.add_argument("--iou", type=float, default=_DEFAULTS.iou, help="IoU threshold of non-maximum suppression")
    group.add_argument("--max-det", type=int, default=_DEFAULTS.max_det, help="most detections kept per image")
    group.add_argument("--masks", default=_DEFAULTS.masks, metavar="NAME",
                       help=f"an instance mask for every box, from a segmenter: {', '.join(SEGMENTERS)} (grabcut "
                            "needs no weights; the SAM models' come from `ovdet weights`), or a SAM weights file "
                            "named like one (default: boxes only); see README, Masks")
    add_trust_option(group)


def add_trust_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--trust-weights: load checkpoints that need code outside ovdet's allowlist."""
    parser.add_argument("--trust-weights", action="store_true",
                        help="load a .pt file even if it needs more than tensors and YOLO-World layers: this runs "
                             "code from the file, only for files you trust (see README, Security)")


def add_classes_option(parser: argparse.ArgumentParser) -> None:
    """--classes (words or a class file) and the exemplar options: what to find."""
    parser.add_argument("--classes", default=None,
                        help='what to find: comma-separated names, e.g. "person,bus,red backpack"; '
                             '"person|man|woman" makes synonyms one class, "!reflection" drops boxes that match '
                             'it best; or a class file (.yaml/.json, see samples/classes/); needed unless '
                             '--exemplar names the classes')
    add_exemplar_options(parser)


EXEMPLAR_SOURCES = ("auto", "region", "clip")  # ovdet.text.exemplars.EXEMPLAR_SOURCES (a test checks they agree)


def add_exemplar_options(parser: argparse.ArgumentParser) -> None:
    """--exemplar NAME=IMAGE[@x1,y1,x2,y2] (repeatable) and --exemplar-source: classes shown by example."""
    parser.add_argument("--exemplar", action="append", default=[], metavar="NAME=IMAGE[@x1,y1,x2,y2]",
                        help='show a class by example: an image and a box in it (pixels; none: the whole image), '
                             'e.g. "pallet jack=ref.jpg@10,20,200,180"; repeat it for more examples or classes; '
                             'it joins the --classes class of that name (fused with its words) or adds a class; '
                             '"!=glare.jpg@..." drops boxes that match it best')
    parser.add_argument("--exemplar-source", choices=EXEMPLAR_SOURCES, default="auto",
                        help="how exemplars become class embeddings: region (the detector's own region embedding "
                             "at the box; auto means region) or clip (CLIP's image tower, from --text-model's files)")


def class_input(args: argparse.Namespace) -> Any:
    """What --classes and --exemplar ask for: the --classes text as given, or a ClassSpec holding the exemplars.
    ClassSpecError when neither is given."""
    exemplars = getattr(args, "exemplar", None) or []
    if not exemplars:
        if not args.classes:
            from ovdet.errors import ClassSpecError

            raise ClassSpecError('Nothing to find: give --classes "person,bus" (or a class file), and/or '
                                 '--exemplar "NAME=IMAGE@x1,y1,x2,y2".')
        return args.classes
    from ovdet.text.exemplars import parse_exemplar
    from ovdet.text.prompts import parse_classes

    return parse_classes(args.classes or None,
                         exemplars=[parse_exemplar(text, source=args.exemplar_source) for text in exemplars])


def detector_config(args: argparse.Namespace, **overrides: Any) -> DetectorConfig:
    """The DetectorConfig of the options add_model_options added (each field's option has the field's name)."""
    return DetectorConfig(**{name: getattr(args, name) for name in DetectorConfig.names()}).replace(**overrides)


def detector_from_args(args: argparse.Namespace, **overrides: Any) -> OVDetector:
    """An OVDetector from the parsed model options (each command's summary line says which backend ran)."""
    from ovdet.detector import OVDetector

    return OVDetector.from_config(detector_config(args, **overrides))


def announce(det: OVDetector, quiet: bool = False) -> OVDetector:
    """Print the backend line on stderr (what runs the model and why) unless `quiet`; returns `det`."""
    if not quiet:
        print(f"ovdet: {shown(det.model_id)} on {det.world.describe()}", file=sys.stderr)
    return det


def backend_words(det: OVDetector) -> str:
    """"openvino fp32": what ran the model, for the commands' summary lines."""
    return f"{det.backend} {det.precision}"


def build_detector(args: argparse.Namespace) -> OVDetector:
    """An OVDetector from the parsed model options, with the classes of --classes and --exemplar set."""
    classes = class_input(args)  # checked before the (slow) model load
    det = detector_from_args(args)
    det.set_classes(classes)
    return det


def add_tile_options(parser: argparse.ArgumentParser) -> None:
    """--tile, --tile-overlap, --no-full-image, --merge: sliced inference for small objects in large images."""
    group = parser.add_argument_group("tiling (small objects in large images)")
    group.add_argument("--tile", type=int, default=None, metavar="SIZE",
                       help="cut each image into SIZE×SIZE tiles, detect in batches of tiles (each at --imgsz) and "
                            "merge the boxes; e.g. 640 for 640-px models, 160-320 for the demo model")
    group.add_argument("--tile-overlap", type=float, default=0.2, metavar="F",
                       help="fraction of a tile that neighbouring tiles share")
    group.add_argument("--no-full-image", dest="full_image", action="store_false",
                       help="skip the extra pass over the whole (shrunken) image that finds large objects")
    group.add_argument("--merge", choices=("nms", "nmm"), default="nms",
                       help="boxes found by several tiles: nms keeps the best, nmm merges them into their union "
                            "(SAHI's greedy NMM; joins the pieces of an object cut by tile borders)")


def tile_options(args: argparse.Namespace) -> TileSpec | None:
    """The TileSpec the tiling options ask for, or None without --tile."""
    if args.tile is None:
        return None
    from ovdet.tiling import TileSpec

    return TileSpec(size=args.tile, overlap=args.tile_overlap, full_image=args.full_image, merge=args.merge)
