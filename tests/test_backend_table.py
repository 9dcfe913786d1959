"""The backend table: every row's class is a Backend that runs what the row declares, resolve and create_backend
follow it, and the CLI's stdlib copy of the names (ovdet.options) and `ovdet export` agree with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from conftest import random_world_model
from ovdet import options
from ovdet.backends import BACKENDS, TABLE, Backend, create_backend, resolve
from ovdet.backends.table import EXPORT_PRECISIONS, EXPORTS
from ovdet.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(TABLE))
def test_every_row_names_a_backend_class_that_is_that_row(name):
    spec = TABLE[name]
    cls = spec.load()
    assert issubclass(cls, Backend) and cls.__name__ == spec.cls
    assert cls.spec is spec  # its name, runtime and precisions are the row's
    assert isinstance(spec.available(), bool)
    assert set(spec.devices) <= {"cpu", "cuda", "mps"} and spec.precisions


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """OpenVINO's CPU probe says: no native bf16 (what precision auto reads), whatever this CPU has."""
    from ovdet.backends import openvino_backend

    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: ["FP32", "INT8", "BIN"])


@pytest.mark.parametrize("name", list(TABLE))
def test_resolve_accepts_exactly_the_precisions_a_row_declares(name, cpu_without_bf16):
    spec = TABLE[name]
    assert resolve(name, "cpu", precision="auto") == resolve(name, "cpu", precision=None)
    assert resolve(name, "cpu").precision in spec.precisions
    for precision in options.BACKEND_PRECISIONS:
        if precision in spec.precisions:
            assert resolve(name, "cpu", precision=precision).precision == precision
        else:
            with pytest.raises(ModelError) as refused:
                resolve(name, "cpu", precision=precision)
            assert str(refused.value) == spec.load().precision_message(precision)
            assert f"not {precision}" in str(refused.value)


def test_the_cli_names_and_export_formats_agree_with_the_table():
    from ovdet.jobs import export

    assert options.BACKENDS == BACKENDS == ("auto", *TABLE)
    assert options.PRECISION_CHOICES == ("auto", *options.BACKEND_PRECISIONS)
    assert sorted(options.BACKEND_PRECISIONS) == sorted({p for spec in TABLE.values() for p in spec.precisions})
    assert list(options.EXPORT_FORMATS.items()) == [(name, fmt.suffix) for name, fmt in EXPORTS.items()]
    assert options.EXPORT_PRECISIONS == EXPORT_PRECISIONS == export.PRECISIONS
    assert export.FORMATS == options.EXPORT_FORMATS
    assert export.LIVE_SUFFIXES == {"onnx": ".onnx", "openvino": ".xml", "engine": ".engine"}
    # each format is the file of the backend that runs it
    assert {name: spec.export.name for name, spec in TABLE.items() if spec.export} == {
        "openvino": "openvino", "onnxruntime": "onnx", "tensorrt": "engine"}


@pytest.mark.parametrize("auto_device, expected", [
    ("cuda", {"torch": ("cuda", "fp16"), "openvino": ("cpu", "fp32"), "onnxruntime": ("cuda", "fp32"),
              "tensorrt": ("cuda", "fp16")}),
    ("mps", {"torch": ("mps", "fp32"), "openvino": ("cpu", "fp32"), "onnxruntime": ("cpu", "fp32"),
             "tensorrt": ("mps", "fp32")}),
])
def test_device_auto_runs_a_backend_on_the_cpu_when_its_row_lacks_the_device(monkeypatch, auto_device, expected,
                                                                            cpu_without_bf16):
    """device='auto' picked a GPU: a backend whose row does not list it (and lists the CPU) runs on the CPU."""
    import ovdet.util.device

    monkeypatch.setattr(ovdet.util.device, "select_device", lambda device: torch.device(auto_device))
    for name, (device, precision) in expected.items():
        choice = resolve(name, "auto")
        assert (choice.device.type, choice.precision) == (device, precision), name
        assert resolve(name, auto_device).device.type == auto_device  # an explicit device is kept


@pytest.mark.parametrize("caps, precision, why", [
    (["FP32", "BF16", "FP16", "INT8"], "bf16", "precision auto: the CPU has native bf16"),
    (["FP32", "INT8", "BIN", "EXPORT_IMPORT"], "fp32", "precision auto: no native bf16 on this CPU"),
])
def test_precision_auto_on_openvino_is_bf16_exactly_when_the_cpu_has_it(monkeypatch, caps, precision, why):
    from ovdet.backends import openvino_backend

    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda: caps)
    for asked in (None, "auto"):
        choice = resolve("openvino", "cpu", precision=asked)
        assert (choice.precision, choice.precision_reason) == (precision, why)
    monkeypatch.delenv(options.BACKEND_ENV)
    assert resolve("auto", "cpu").precision == precision  # backend auto on a CPU is OpenVINO: the same choice
    forced = resolve("openvino", "cpu", precision="fp32")  # asked for: exact fp32 whatever the CPU has
    assert (forced.precision, forced.precision_reason) == ("fp32", "")
    # the other backends' defaults do not depend on bf16
    assert [resolve(name, "cpu").precision for name in ("torch", "onnxruntime")] == ["fp32", "fp32"]


def test_the_cli_accepts_precision_auto_and_keeps_none_as_the_default():
    from ovdet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["detect", "x.jpg", "--classes", "a"]).precision is None
    assert parser.parse_args(["detect", "x.jpg", "--classes", "a", "--precision", "auto"]).precision == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["detect", "x.jpg", "--classes", "a", "--precision", "fp8"])


@pytest.mark.parametrize("name", ["torch", "openvino", "onnxruntime"])
def test_create_backend_builds_the_row_class_and_describes_it(name, cpu_without_bf16):
    model = random_world_model(seed=1).fuse(verbose=False).eval()
    threads = torch.get_num_threads()
    try:
        backend = create_backend(resolve(name, "cpu"), model, lambda: "tiny@0", threads=1)
        assert type(backend) is TABLE[name].load() and backend.exports == 0  # nothing exported before a run
        assert backend.describe() == f"{name} fp32, 1 thread"
        if name != "torch":
            assert create_backend(resolve(name, "cpu"), model, lambda: "tiny@0", threads=3).describe() == \
                f"{name} fp32, 3 threads"
    finally:
        torch.set_num_threads(threads)  # the torch backend sets the process's threads


def test_backends_use_only_public_names_of_other_modules():
    """The TensorRT backend (and every other) goes through the public functions of the module it uses."""
    private = []
    for path in sorted((ROOT / "ovdet" / "backends").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ovdet"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
