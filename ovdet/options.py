"""Names and values that option parsers share with the modules behind them; stdlib only, so `ovdet --help` is fast.

Each value is defined here once: the modules that use it (ovdet.datasets.formats, ovdet.text.prompts, ovdet.jobs.synth,
ovdet.video.live, ovdet.text.cache) import it from here and re-export it under their own names, and the CLI builds its
options from here without importing torch, OpenCV or transformers. The backend and export names are the exception: their
source is the backend table (ovdet.backends.table), and a test checks that this copy agrees with it.
"""

from __future__ import annotations

# ovdet.backends: what runs the forward pass, and at which precision; the names and precisions of the backend table
# (ovdet.backends.table, which imports torch), repeated here for the parser: tests/test_backend_table.py checks them
BACKENDS = ("auto", "torch", "openvino", "onnxruntime", "tensorrt")
BACKEND_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
PRECISION_AUTO = "auto"  # the default: what the backend picks on this machine (bf16 for OpenVINO on CPUs with bf16)
PRECISION_CHOICES = (PRECISION_AUTO, *BACKEND_PRECISIONS)  # what --precision accepts
BACKEND_ENV = "OVDET_BACKEND"  # what backend="auto" means when set (e.g. torch)

# ovdet.datasets.formats: the dataset formats a run writes
DATASET_FORMATS = ("coco", "yolo", "voc", "jsonl")

# ovdet.jobs.export: format -> how ultralytics recognises an exported file by its name (AutoBackend looks at the
# suffix), and the precisions an exported file can hold; the export formats of the backend table, as above
EXPORT_FORMATS = {"onnx": ".onnx", "openvino": "_openvino_model", "engine": ".engine"}
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")

# ovdet.text.prompts: how a class's phrasings combine into one score
REDUCTIONS = ("max", "mean")

# ovdet.text.cache: the environment variable that sets the cache's size limit in megabytes
EMBEDDING_CACHE_MB_ENV = "OVDET_EMBEDDING_CACHE_MB"

# ovdet.jobs.synth: BGR colours an object (or a piece of clutter) can have, by name; shapes; the default vocabulary
SYNTH_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (30, 30, 220),
    "green": (40, 180, 40),
    "blue": (220, 70, 30),
    "yellow": (30, 220, 230),
    "purple": (170, 40, 150),
    "orange": (20, 140, 250),
    "cyan": (220, 210, 40),
    "pink": (190, 160, 250),
    "brown": (30, 70, 120),
}
SYNTH_SHAPES = ("circle", "square", "triangle", "star")
SYNTH_DEFAULT_COLOURS = ("red", "green", "blue")
SYNTH_DEFAULT_SHAPES = ("circle", "square", "triangle")

# ovdet.video.live: the keys of the live window, as its help line and `ovdet webcam --help` show them
LIVE_KEYS_HELP = "keys: q/Esc quit · space pause · s snapshot · r record on/off · c change classes"
