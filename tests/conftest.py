"""Shared fixtures: random-weight YOLO-World models and text towers (no pretrained weights, no network)."""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics.nn.modules.head import WorldDetect
from ultralytics.nn.tasks import WorldModel

from ovdet.weights.checkpoint import _quiet_ultralytics


# The files that take longest run first: with pytest-xdist (`-n 2`; pyproject sets --dist loadfile, which keeps each
# file, and its module-scoped fixtures, on one worker, and --no-loadscope-reorder, which keeps this order) the two
# workers start on them and the short files fill in at the end. Without xdist only the order changes.
# Measured with -n 2 --junitxml (sum of test times per file, 2026-12-03).
SLOW_FIRST = ("test_ray.py", "test_readme.py", "test_export.py", "test_backends.py", "test_write_errors.py",
              "test_warm_start.py", "test_world.py", "test_annotate.py", "test_notebook.py", "test_checkpoint.py",
              "test_cli_startup.py", "test_hostile_checkpoint.py", "test_train.py", "test_exemplar_detect.py",
              "test_hostile_configs.py", "test_mutations_caught.py", "test_masks_sam.py", "test_tiling.py",
              # added since (from --durations of a -n 2 run): 40-60 s each
              "test_serve_ray.py", "test_backend_line.py", "test_openvino_throughput.py", "test_masks_eval.py",
              "test_serve_page.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any test that tries to reach a non-loopback address."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")):
            raise AssertionError(f"test tried to reach the network: {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """The same isolation for module- and session-scoped fixtures, which are set up before function-scoped ones:
    without it they would run on the default backend and read and write the user's real ~/.cache/ovdet. Fails the
    session if anything in the real ovdet home changed while the tests ran."""
    real = Path(os.environ.get("OVDET_HOME") or Path.home() / ".cache" / "ovdet")
    before = _tree_state(real)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OVDET_HOME", str(tmp_path_factory.mktemp("ovdet_session_home")))
        mp.setenv("OVDET_OFFLINE", "1")
        mp.setenv("OVDET_BACKEND", "torch")
        yield
    assert _tree_state(real) == before, f"the tests changed files in the real ovdet home {real}"


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root; {} when it does not exist."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")} if root.is_dir() else {}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own OVDET_HOME, is offline and runs the torch backend unless it says otherwise."""
    monkeypatch.setenv("OVDET_HOME", str(tmp_path_factory.mktemp("ovdet_home")))
    monkeypatch.setenv("OVDET_OFFLINE", "1")
    # backend "auto" means torch in tests: the reference path, with nothing to export per test (OpenVINO, ONNX
    # Runtime and the auto choice itself are tested in tests/test_backends*.py)
    monkeypatch.setenv("OVDET_BACKEND", "torch")


def random_world_model(cfg: str = "yolov8n-worldv2.yaml", seed: int = 0) -> WorldModel:
    """A YOLO-World model from an ultralytics config with seeded random weights and a head whose scores spread.

    Freshly initialised heads give almost constant scores (class bias -10); redrawing bias and logit scale makes
    scores vary between boxes so box-for-box comparisons mean something.
    """
    torch.manual_seed(seed)
    with _quiet_ultralytics():
        model = WorldModel(cfg, verbose=False)
    gen = torch.Generator().manual_seed(seed)
    head = model.model[-1]
    assert isinstance(head, WorldDetect)
    for contrastive in head.cv4:
        contrastive.bias.data.fill_(-3.0 + 0.5 * float(torch.rand(1, generator=gen)))
        contrastive.logit_scale.data.fill_(math.log(25.0 + 15.0 * float(torch.rand(1, generator=gen))))
    for module in model.modules():  # running stats away from (0, 1) so fused BN is not an identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def save_world_checkpoint(model: WorldModel, path) -> None:
    """Write a model the way ultralytics checkpoints hold it."""
    torch.save({"model": model, "train_args": {}}, path)


def outline_difference(drawn: np.ndarray, plain: np.ndarray, box) -> float:
    """Mean absolute difference of two images on the 1-pixel outline of `box` (x1, y1, x2, y2, image pixels)."""
    h, w = plain.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
    y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)
    ring = np.zeros((h, w), bool)
    ring[y1, x1:x2 + 1] = ring[y2, x1:x2 + 1] = ring[y1:y2 + 1, x1] = ring[y1:y2 + 1, x2] = True
    return float(np.abs(drawn.astype(int) - plain.astype(int))[ring].mean())


def deny_reading(path: Path, monkeypatch) -> None:
    """Make `path` unreadable: mode 0, and where that does not stop this process (root), opening it raises the
    PermissionError (EACCES) the kernel gives everyone else, from every way of opening a file."""
    import builtins
    import errno
    import io

    path.chmod(0)
    if os.geteuid() != 0:
        return
    target = os.path.realpath(path)

    def denied(real):
        def guarded(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and kwargs.get("dir_fd") is None \
                    and os.path.realpath(file) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
            return real(file, *args, **kwargs)
        return guarded

    monkeypatch.setattr(builtins, "open", denied(builtins.open))
    monkeypatch.setattr(io, "open", denied(io.open))
    monkeypatch.setattr(os, "open", denied(os.open))


def random_embeddings(num_classes: int, dim: int = 512, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_classes, dim, generator=gen)
    return emb / emb.norm(dim=-1, keepdim=True)


def scene(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image of random coloured rectangles and circles on noise."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(12):
        color = tuple(int(c) for c in rng.integers(40, 255, 3))
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        s = int(rng.integers(15, max(16, min(height, width) // 3)))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + s, y + s), color, -1)
        else:
            cv2.circle(img, (x, y), s // 2, color, -1)
    return img


@pytest.fixture
def clip_stand_in(monkeypatch):
    """Tests that put a small stand-in ViT-B-32.pt where the published CLIP file goes: without its published sha256
    in the registry (ovdet checks a registry file against it on load, and would rightly refuse the stand-in)."""
    import dataclasses

    from ovdet.weights import registry as weights

    spec = weights.REGISTRY[weights.DEFAULT_TEXT_MODEL]
    monkeypatch.setitem(weights.REGISTRY, spec.name, dataclasses.replace(spec, sha256=None))


@pytest.fixture(scope="session")
def tiny_world_checkpoint(tmp_path_factory):
    """Path of a random yolov8n-worldv2 checkpoint with a spread head."""
    path = tmp_path_factory.mktemp("weights") / "tiny-worldv2.pt"
    save_world_checkpoint(random_world_model("yolov8n-worldv2.yaml", seed=0), path)
    return path


@pytest.fixture(scope="session")
def tiny_text_encoder():
    from ovdet.text.tower import TextEncoder

    return TextEncoder.random(seed=0)


@pytest.fixture
def tiny_detector(tiny_world_checkpoint, tiny_text_encoder):
    """OVDetector on CPU at imgsz 160: random yolov8n-worldv2 and a small random text tower."""
    from ovdet import OVDetector

    return OVDetector(tiny_world_checkpoint, text_model=tiny_text_encoder, device="cpu", imgsz=160)


# Results compared across processes, batch make-up or model builds agree to these tolerances, not bit for bit: the
# journal rounds boxes to 0.01 px and scores to 1e-5, so a difference of 1e-7 in the float can move the last digit.
CROSS_RUN_TOLERANCE = {"score": 1e-4, "bbox": 0.02, "area": 0.5, "text": 2e-5, "voc": 1.0}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def assert_close_data(got, want, tol: dict[str, float] = CROSS_RUN_TOLERANCE, where: str = "$", key: str = "") -> None:
    """JSON-like data equal in structure, strings and ints; a float under key K within tol[K] (0 for other keys)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close_data(got[k], want[k], tol, f"{where}.{k}", k)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close_data(g, w, tol, f"{where}[{i}]", key)
    elif isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and abs(got - want) <= tol.get(key, 0.0), \
            f"{where}: {got!r} != {want!r} (tolerance {tol.get(key, 0.0)})"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_close_text(got: str, want: str, tol: float) -> None:
    """Two label files equal word for word, their numbers within `tol`."""
    assert _NUMBER.sub("#", got) == _NUMBER.sub("#", want), f"{got!r} != {want!r}"
    for g, w in zip(_NUMBER.findall(got), _NUMBER.findall(want)):
        assert abs(float(g) - float(w)) <= tol, f"{g} != {w} (tolerance {tol}) in\n{got}"
