"""`ovdet export`: write a detector as a file other runtimes load (ONNX, OpenVINO IR, TensorRT engine)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ovdet.backends.table import EXPORT_PRECISIONS as PRECISIONS
from ovdet.backends.table import EXPORTS
from ovdet.weights.checkpoint import _quiet_ultralytics
from ovdet.text.cache import LazyTextEncoder
from ovdet.errors import ClassSpecError, ModelError
from ovdet.text.prompts import ClassSpec, parse_classes
from ovdet.text.tower import TextEncoder
from ovdet.model.world import WorldDetector
from ovdet.util.device import cpu_float32

# the formats and precisions come from the backend table (ovdet.options repeats them for the CLI parser, without
# torch): format -> how ultralytics recognises a baked export by its name (AutoBackend looks at the suffix), and
# the live-vocabulary graph's file, which is not an ultralytics file (an .onnx, an OpenVINO .xml + .bin, an .engine)
FORMATS = {name: fmt.suffix for name, fmt in EXPORTS.items()}
LIVE_SUFFIXES = {name: fmt.live_suffix for name, fmt in EXPORTS.items()}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote: the file or folder, and what it holds."""

    path: Path
    format: str
    precision: str
    imgsz: int
    classes: list[str] | None  # the baked vocabulary; None: live vocabulary (text embeddings are an input)
    seconds: float


def default_output(model_name: str, fmt: str, precision: str, classes: Sequence[str] | None) -> Path:
    """`NAME[-live][-PRECISION]` + the format's suffix, in the current folder (ultralytics' naming, so a baked file
    loads with `YOLO(path)` as is)."""
    stem = model_name + ("" if classes is not None else "-live") + ("" if precision == "fp32" else f"-{precision}")
    return Path(stem + (FORMATS if classes is not None else LIVE_SUFFIXES)[fmt])


def check_export_options(fmt: str, precision: str) -> None:
    """Refuse a format or precision this machine cannot produce, saying what to use instead."""
    if fmt not in FORMATS:
        raise ModelError(f"Unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if precision == "bf16":
        raise ModelError("bf16 is a runtime setting, not a file format: export fp32 (OpenVINO runs an fp32 IR in "
                         "bf16 by default on CPUs that have it; ovdet's --backend openvino --precision bf16 asks "
                         "for it explicitly).")
    if precision not in PRECISIONS:
        raise ModelError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if fmt == "engine":
        if not torch.cuda.is_available():
            raise ModelError("A TensorRT engine is built on the NVIDIA GPU that will run it, and CUDA is not "
                             "available here: export onnx instead and build the engine on the GPU machine.")
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise ModelError("TensorRT is not installed: pip install tensorrt (or install ovdet[tensorrt]).") from exc
    if fmt == "onnx" and precision == "int8":
        _require("onnxruntime", "onnxruntime", "int8 ONNX export (calibration runs in ONNX Runtime)")
    if fmt == "openvino":
        _require("openvino", "openvino", "OpenVINO export")
        if precision == "int8":
            _require("nncf", "nncf", "int8 OpenVINO export (post-training quantization)")
    _require("onnx", "onnx", f"{fmt} export")


def _require(module: str, package: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ModelError(f"{what} needs {package}: pip install {package} (or pip install 'ovdet[export]').") from exc


def baked_spec(classes: str | Path | Sequence[str] | ClassSpec) -> ClassSpec:
    """The classes of a baked export: one prompt per class (templates allowed), since the exported file scores
    exactly one embedding row per class and has no per-class thresholds."""
    spec = parse_classes(classes)
    if not spec.is_plain:
        raise ClassSpecError("A baked-vocabulary export holds one text embedding per class, so synonyms (a|b) and "
                             "negatives (!x) cannot be baked in: list plain classes, or export without --classes "
                             "(the live-vocabulary graph) and let ovdet score synonyms and negatives.")
    if any(t is not None for t in spec.thresholds):
        raise ClassSpecError("Per-class thresholds (conf: in a class file) cannot be baked into an exported model: "
                             "ultralytics applies one conf to every class. Remove them, or use the live-vocabulary "
                             "export with ovdet.")
    return spec


def export_model(model: str | Path = "yolov8s-worldv2", format: str = "onnx",
                 classes: str | Path | Sequence[str] | ClassSpec | None = None, out: str | Path | None = None,
                 precision: str = "fp32", imgsz: int | None = None, calib: str | Path | None = None,
                 text_model: str | Path | TextEncoder | None = None, trust_weights: bool = False,
                 batch: int = 1, dynamic: bool = False) -> ExportResult:
    """Export a detector. With `classes`: a baked-vocabulary file made by ultralytics' own exporter, which
    `ultralytics.YOLO(path).predict(image)` runs unchanged (class names in its metadata). Without: the
    live-vocabulary graph, whose inputs are the images and the text embeddings (see the README)."""
    fmt, precision = str(format).lower(), str(precision).lower()
    check_export_options(fmt, precision)
    start = time.perf_counter()
    world = WorldDetector.load(model, device="cpu", trust_weights=trust_weights)
    size = int(imgsz or world.train_imgsz)
    if size % world.stride:
        raise ModelError(f"imgsz {size} is not a multiple of the model's stride {world.stride}: use e.g. "
                         f"{max(world.stride, round(size / world.stride) * world.stride)}.")
    text = LazyTextEncoder(text_model, device="cpu", embedded_state=world.text_encoder_state)
    if classes is None:
        target = Path(out) if out is not None else default_output(world.name, fmt, precision, None)
        path = export_live(world, fmt, target, precision, size, text_identity=_text_identity(text))
        return ExportResult(path, fmt, precision, size, None, time.perf_counter() - start)
    spec = baked_spec(classes)
    embeddings = spec.embed(text.encode)
    target = Path(out) if out is not None else default_output(world.name, fmt, precision, spec.names)
    path = export_baked(world, spec.names, embeddings, fmt, target, precision, size, calib, batch, dynamic)
    return ExportResult(path, fmt, precision, size, spec.names, time.perf_counter() - start)


def export_baked(world: WorldDetector, names: Sequence[str], embeddings: np.ndarray | torch.Tensor, fmt: str,
                 out: Path,
                 precision: str = "fp32", imgsz: int = 640, calib: str | Path | None = None, batch: int = 1,
                 dynamic: bool = False) -> Path:
    """Set `embeddings` ([C, D], one row per name) on the model as ultralytics' `set_classes` would, and run
    ultralytics' Exporter; the result is moved to `out` (a `.onnx` file, a `*_openvino_model` folder, an `.engine`)."""
    from ultralytics.engine.exporter import Exporter
    from ultralytics.nn.modules.block import ImagePoolingAttn

    if any(isinstance(m, ImagePoolingAttn) for m in world.model.modules()):
        raise ModelError("ultralytics exports only YOLO-World v2 models with a baked vocabulary (v1's image-pooling "
                         "neck does not export): export without --classes for v1's live-vocabulary graph.")
    if embeddings.ndim != 2 or len(embeddings) != len(names):
        raise ClassSpecError(f"{len(names)} class names but embeddings of shape {tuple(embeddings.shape)}.")
    out = _check_output(out, fmt)
    model = world.model.to(memory_format=torch.contiguous_format)
    model.txt_feats = torch.from_numpy(cpu_float32(embeddings))[None]
    model.model[-1].nc = len(names)
    model.names = dict(enumerate(names))
    model.task = "detect"
    args = getattr(model, "args", None)
    model.args = {**(args if isinstance(args, dict) else {}), "imgsz": imgsz, "data": ""}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ovdet-export-", dir=out.parent))
    try:
        model.pt_path = str(work / f"{world.name}.pt")  # where ultralytics names and writes its output
        overrides = {"format": fmt, "imgsz": imgsz, "batch": batch, "dynamic": dynamic, "device":
                     "0" if fmt == "engine" else "cpu", "quantize": {"fp32": None, "fp16": 16, "int8": 8}[precision],
                     "data": _calibration_yaml(calib, work, names) if precision == "int8" else None,
                     "verbose": False, "mode": "export"}
        with _quiet_ultralytics():
            written = Path(Exporter(overrides=overrides)(model=model))
        _replace(written, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _text_identity(text: LazyTextEncoder) -> str:
    """The text tower's cache identity, or the reason it is not known (a tower that is not available offline)."""
    try:
        return text.identity
    except ModelError as exc:
        return f"unknown ({exc})"


def live_metadata(world: WorldDetector, imgsz: int, precision: str, text_identity: str) -> dict[str, str]:
    """What a runtime needs to drive the live graph, stored in the exported file (ONNX metadata_props / OpenVINO
    rt_info under `ovdet`)."""
    from ovdet.version import __version__
    from ovdet.backends import IMAGES, OUTPUT, TEXT

    return {
        "producer": f"ovdet {__version__}",
        "model": world.model_id,
        "vocabulary": "live",
        "precision": precision,
        "stride": str(world.stride),
        "imgsz": str(imgsz),
        "embed_dim": str(world.embed_dim),
        "text_model": text_identity,
        "inputs": f"{IMAGES}: float32 [batch, 3, height, width] RGB in 0..1, letterboxed (pad 114/255), height and "
                  f"width multiples of {world.stride}; {TEXT}: float32 [1 or batch, classes, {world.embed_dim}] "
                  "L2-normalized text embeddings, one row per prompt",
        "outputs": f"{OUTPUT}: float32 [batch, 4 + classes, anchors]: cx, cy, w, h in input pixels, then one sigmoid "
                   "score per text row; no NMS",
    }


def export_live(world: WorldDetector, fmt: str, out: Path, precision: str = "fp32", imgsz: int = 640,
                text_identity: str = "") -> Path:
    """Write the live-vocabulary graph (ovdet.backends.graph: inputs images and txt_feats, every axis dynamic) as an
    ONNX file, an OpenVINO IR (.xml + .bin) or a TensorRT engine, with `live_metadata` inside."""
    import onnx

    from ovdet.backends import export_onnx

    if precision == "int8":
        raise ModelError("int8 live-vocabulary export is not available: int8 calibrates with a vocabulary, so bake "
                         "one in (--classes ... --precision int8), or run ovdet --backend openvino --precision int8.")
    suffix = LIVE_SUFFIXES[fmt]
    if out.suffix != suffix:
        raise ModelError(f"--out {out}: the live-vocabulary {fmt} export is a {suffix} file, e.g. "
                         f"{out.with_name(out.name + suffix)}.")
    if out.is_dir():
        raise ModelError(f"--out {out} is a folder: give the {suffix} file to write.")
    meta = live_metadata(world, imgsz, precision, text_identity)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ovdet-export-", dir=out.parent))
    try:
        path = export_onnx(world.model, work / "live.onnx")
        graph = onnx.load(str(path))
        for key, value in meta.items():
            prop = graph.metadata_props.add()
            prop.key, prop.value = key, value
        if precision == "fp16" and fmt == "onnx":
            from onnxruntime.transformers import float16

            graph = float16.convert_float_to_float16(graph, keep_io_types=True)  # float32 in and out, as documented
        onnx.save(graph, str(path))
        if fmt == "onnx":
            os.replace(path, out)
        elif fmt == "openvino":
            import openvino as ov

            model = ov.convert_model(str(path))
            for key, value in meta.items():
                model.set_rt_info(value, ["ovdet", key])
            ov.save_model(model, str(work / "live.xml"), compress_to_fp16=precision == "fp16")
            os.replace(work / "live.bin", out.with_suffix(".bin"))  # weights first: the .xml names a complete pair
            os.replace(work / "live.xml", out)
        else:
            import json

            from ovdet.backends.tensorrt import Profile, build_engine

            profile = Profile(imgsz=imgsz, max_size=max(1280, imgsz))
            (work / "live.engine").write_bytes(build_engine(path, precision, imgsz, world.embed_dim, profile))
            meta["profile"] = profile.key()  # batch, sizes and prompt counts the engine accepts
            (work / "live.json").write_text(json.dumps(meta, indent=1))
            os.replace(work / "live.json", out.with_suffix(".json"))
            os.replace(work / "live.engine", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _check_output(out: Path, fmt: str) -> Path:
    suffix = FORMATS[fmt]
    if not out.name.endswith(suffix):
        kind = "folder" if fmt == "openvino" else "file"
        raise ModelError(f"--out {out}: a {fmt} export is a {kind} whose name ends in {suffix!r} (that is how "
                         f"ultralytics and ovdet recognise it), e.g. {out.with_name(out.name + suffix)}.")
    if out.is_dir() and fmt != "openvino":
        raise ModelError(f"--out {out} is a folder: give the {suffix} file to write.")
    if out.exists() and fmt == "openvino":
        if not out.is_dir() or any(p.suffix not in {".xml", ".bin", ".yaml"} for p in out.iterdir()):
            raise ModelError(f"--out {out} exists and is not an OpenVINO export folder: choose another path "
                             "(ovdet replaces only a previous export).")
    return out


def _replace(written: Path, out: Path) -> None:
    """Move the exporter's output over `out` (a rename on one file system, so `out` is never half-written)."""
    if written.is_dir():
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            written.rename(out)
            shutil.rmtree(old)
        else:
            written.rename(out)
    else:
        os.replace(written, out)


def _calibration_yaml(calib: str | Path | None, work: Path, names: Sequence[str]) -> str:
    """A one-split YOLO dataset (images linked, empty labels) over the calibration images, for ultralytics' int8
    calibration loader."""
    import yaml

    folder = Path(calib) if calib is not None else Path(__file__).resolve().parents[2] / "samples"
    if not folder.is_dir():
        raise ModelError(f"Calibration folder {folder} not found: int8 needs representative images, give "
                         "--calib DIR.")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ModelError(f"No images in the calibration folder {folder}: give --calib DIR with a few hundred "
                         "images like the ones the model will see.")
    root = work / "calib"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, image in enumerate(images):
        link = root / "images" / f"{i:06d}{image.suffix.lower()}"
        link.symlink_to(image.resolve())
        (root / "labels" / f"{i:06d}.txt").touch()
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images",
                                    "names": dict(enumerate(names))}))
    return str(data)
