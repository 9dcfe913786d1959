"""OpenVINO backend: the live-vocabulary graph as OpenVINO IR on the CPU, fp32, bf16 or int8 (NNCF post-training).

Without a precision it runs the one OpenVINO itself would pick: bf16 on CPUs with native bf16 (AVX512-BF16 / AMX),
fp32 elsewhere. The compiled blob of each precision is kept beside the IR in its compiled-model cache entry
(OpenVINO's CACHE_DIR), so a second process loads it instead of compiling again.

A batch of more than one image (detect_batch, and so the folder jobs: annotate, video, eval, tiling) runs on a second
compilation of the same IR with OpenVINO's THROUGHPUT hint: its streams share the same INFERENCE_NUM_THREADS budget
(never more threads in all), the batch is split into one contiguous slice per stream, all slices are in flight at
once, and the outputs are joined in order. One image (detect, the webcam) keeps the LATENCY compilation: one stream
with every thread. Both load the same compiled blob (OpenVINO keys its blob by the graph and precision, not by the
hint). Measured on 2 cores, fp32 yolov8s-worldv2, batches of 8 (benchmarks/bench_ov_streams.py): the model alone
1.06-1.23x, detect_batch and annotate 1.08-1.11x the images/s of one LATENCY request on the whole batch.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from ovdet.backends.base import Calibration, ExportedBackend
from ovdet.backends.cache import require_installed, require_module
from ovdet.backends.table import IMAGES, TABLE, TEXT
from ovdet.errors import ModelError

INSTALL = "pip install openvino (a dependency of ovdet: reinstall ovdet)"
INSTALL_INT8 = 'pip install "ovdet[int8]" (or pip install nncf)'
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: what NNCF leaves unquantized stays f32
# int8 quantizes the convolutions and what feeds them. Kept f32: every op that touches the text embeddings (the
# neck's attention, v1's image-pooling attention, the contrastive head: MatMul / Einsum, cv4), so any vocabulary
# scores as the calibration one did; the integral (DFL) conv; and the box decoding and score ops after the head
# (top-level Sub/Add/Mul/Div/Concat/Sigmoid of LiveWorldGraph), whose values are pixel coordinates that 8 bits
# would round by ~1/256 of the image. Measured on the demo model (benchmarks/accuracy_precisions.py): quantizing
# the decoding too cost 0.015-0.037 mAP50-95; keeping it f32 brings int8 within 0.01 of fp32.
_INT8_IGNORED = {"types": ["MatMul", "Einsum"],
                 "patterns": [".*dfl.*", r"/cv4\..*", r"/(Sub|Add|Mul|Div|Sigmoid|Concat)(_\d+)?$"]}
INT8_RECIPE = 2  # bump when the quantization settings change: part of the cache key


def available() -> bool:
    """True when the openvino package can be imported."""
    return OpenVINOBackend.spec.installed()


BLOBS = "openvino_blobs"  # OpenVINO's compiled blobs (CACHE_DIR), one per precision, inside the cache entry


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU can do (e.g. FP32, BF16, INT8); asked once per process."""
    ov = require_module("openvino", INSTALL, "The openvino backend")
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVINOBackend(ExportedBackend):
    """Runs the graph with OpenVINO's CPU plugin; `INFERENCE_PRECISION_HINT` is always set explicitly, so fp32 means
    exact fp32 even on CPUs where the plugin would pick bf16 by itself."""

    spec = TABLE["openvino"]

    @classmethod
    def auto_precision(cls, device_type: str, half: bool | None = None) -> tuple[str, str]:
        """bf16 where the CPU runs it natively (OpenVINO's own default there; ~1.8x fp32's speed for the same mAP on
        the demo, README Backends), fp32 elsewhere, where OpenVINO would run a bf16 request as fp32 anyway."""
        if "BF16" in cpu_capabilities():
            return "bf16", "precision auto: the CPU has native bf16"
        return "fp32", "precision auto: no native bf16 on this CPU"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device_type != "cpu":
            raise ModelError(f"The openvino backend runs on the CPU, not {self.device_name}: use device='cpu' "
                             "(--device cpu), or backend='tensorrt' / 'torch' on a GPU.")
        self._ov = require_module("openvino", INSTALL, "The openvino backend")
        if self.precision == "bf16" and "BF16" not in cpu_capabilities():
            raise ModelError("This CPU has no bf16 support (OpenVINO reports "
                             f"{', '.join(cpu_capabilities())}): use precision fp32 or int8.")
        if self.precision == "int8":  # said now, imported only if the int8 model has to be built (not cached)
            require_installed("nncf", INSTALL_INT8, "int8 with the openvino backend")
        self._request = None
        self._folder: Path | None = None
        self._streams = None  # (compiled THROUGHPUT model, its infer requests): made on the first batch of 2+
        self.throughput = True  # False: batches run as one LATENCY request too (benchmarks, tests)

    def kind(self, calibration: Calibration | None) -> str:
        return f"int8r{INT8_RECIPE}-{calibration.digest}" if calibration is not None else "fp32"  # bf16 compiles the fp32 file

    def extra_packages(self, kind: str) -> tuple[str, ...]:
        return ("nncf", "onnx") if kind.startswith("int8") else ("onnx",)

    def _build(self, folder: Path, kind: str, calibration: Calibration | None, txt_feats: np.ndarray | None) -> None:
        from ovdet.backends import graph

        ov = self._ov
        onnx_path = graph.export_onnx(self.model, folder / "graph.onnx")
        model = ov.convert_model(str(onnx_path))
        if calibration is not None:
            model = _quantize(model, calibration, txt_feats)
        ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)  # fp16 weights would change fp32
        onnx_path.unlink()

    def compile_config(self, folder: Path | None = None, throughput: bool = False) -> dict[str, object]:
        """The properties the model is compiled with: the precision hint (f32 for fp32 and int8, bf16 for bf16, never
        left to the plugin), threads, and CACHE_DIR inside the cache entry `folder` when writable. LATENCY (single
        images): one stream on every thread. `throughput` (batches): the THROUGHPUT hint, whose streams (the plugin
        picks how many: 2 on 2 cores) split the same INFERENCE_NUM_THREADS between them."""
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision],
                                     "INFERENCE_NUM_THREADS": self.threads}
        config.update({"PERFORMANCE_HINT": "THROUGHPUT"} if throughput else
                      {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
        blobs = _blob_dir(folder) if folder is not None else None
        if blobs is not None:
            config["CACHE_DIR"] = str(blobs)
        return config

    def compiled_property(self, name: str, throughput: bool = False) -> object:
        """A property of the compiled model (compiling it first), e.g. INFERENCE_PRECISION_HINT (what OpenVINO really
        runs), PERFORMANCE_HINT / NUM_STREAMS, or LOADED_FROM_CACHE (True when the blob cache served it instead of a
        compilation); `throughput`: of the compilation that runs batches."""
        self.prepare()
        if throughput:
            with self._lock:
                compiled = self._throughput_model()[0]
        else:
            compiled = self._runner
        value = compiled.get_property(name)
        return value.get_type_name() if isinstance(value, self._ov.Type) else value

    def _load(self, folder: Path):
        compiled = self._ov.Core().compile_model(str(folder / "model.xml"), "CPU", self.compile_config(folder))
        self._request = compiled.create_infer_request()
        self._folder, self._streams = folder, None
        return compiled

    def _throughput_model(self):
        """The THROUGHPUT compilation and one infer request per stream, made on first use (from the blob cache when
        the LATENCY one put the blob there)."""
        if self._streams is None:
            compiled = self._ov.Core().compile_model(str(self._folder / "model.xml"), "CPU",
                                                     self.compile_config(self._folder, throughput=True))
            streams = max(1, int(compiled.get_property("NUM_STREAMS")))
            self._streams = compiled, [compiled.create_infer_request() for _ in range(streams)]
        return self._streams

    def _infer(self, images: np.ndarray, txt: np.ndarray) -> np.ndarray:
        if self.throughput and len(images) > 1:
            requests = self._throughput_model()[1]
            if len(requests) > 1:
                return _in_flight(requests, images, txt)
        self._request.infer({IMAGES: images, TEXT: txt})
        return self._request.get_output_tensor(0).data.copy()


def _in_flight(requests: list, images: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """`images` split into one contiguous slice per request (per-image text embeddings split alike), all started
    before any is waited for, and the outputs joined in the slices' order: the same rows as one request would give."""
    parts = np.array_split(np.arange(len(images)), min(len(requests), len(images)))
    per_image = len(txt) == len(images) and len(txt) > 1
    for request, part in zip(requests, parts):
        request.start_async({IMAGES: np.ascontiguousarray(images[part[0]:part[-1] + 1]),
                             TEXT: np.ascontiguousarray(txt[part[0]:part[-1] + 1]) if per_image else txt})
    out = []
    for request, _ in zip(requests, parts):
        request.wait()
        out.append(request.get_output_tensor(0).data)
    return np.concatenate(out)


def _blob_dir(folder: Path) -> Path | None:
    """The entry's folder for OpenVINO's compiled blobs, or None when the entry cannot be written (a read-only shared
    $OVDET_HOME): then every process compiles, as it would without the blob cache, and nothing else changes."""
    blobs = folder / BLOBS
    try:
        blobs.mkdir(exist_ok=True)
    except OSError:
        return None
    return blobs if os.access(blobs, os.W_OK | os.X_OK) else None


def _quantize(model, calibration: Calibration, txt_feats: np.ndarray | None):
    """NNCF post-training quantization of the convolutions on the calibration images."""
    nncf = require_module("nncf", INSTALL_INT8, "int8 with the openvino backend")

    if txt_feats is None:
        raise ModelError("int8 calibrates with the current class embeddings: set the classes before the first "
                         "detection (set_classes).")
    items = list(calibration.inputs(txt_feats))
    if not items:
        raise ModelError(f"No calibration images in {calibration.source}: give calib=DIR with a few dozen images "
                         "like the ones you will detect in.")
    dataset = nncf.Dataset(items, lambda item: {IMAGES: item[0], TEXT: item[1]})
    level = nncf.nncf_logger.level
    nncf.set_log_level(logging.WARNING)  # not one INFO line per layer it leaves alone
    try:
        return nncf.quantize(model, dataset, subset_size=len(items), preset=nncf.QuantizationPreset.MIXED,
                             ignored_scope=nncf.IgnoredScope(**_INT8_IGNORED, validate=False))
    finally:
        nncf.set_log_level(level)
