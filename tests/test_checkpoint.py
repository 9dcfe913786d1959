"""Checkpoints that cannot run code: allowlist, refusals on every load path, trust, safetensors, TorchScript as data."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
from copy import deepcopy

import numpy as np
import psutil
import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import WorldModel
from ultralytics.utils import DEFAULT_CFG

from conftest import random_world_model, save_world_checkpoint, scene
from ovdet import OVDetector
from ovdet.weights.checkpoint import (ALLOWED_GLOBALS, check_model_config, convert_to_safetensors, load_checkpoint,
                              pickle_globals)
from ovdet.cli import main
from ovdet.errors import WeightsCorruptError, WeightsUnsafeError
from ovdet.weights.registry import DEMO_FILE, import_weights, weights_dir
from ovdet.model.world import load_world_checkpoint
from ovdet.weights.checkpoint import _quiet_ultralytics

WORLD_CONFIGS = [f"yolov8{size}-{version}.yaml" for version in ("world", "worldv2") for size in "smlx"]


def trainer_layout(model: WorldModel) -> dict:
    """A checkpoint laid out as ultralytics' trainer saves it (BaseTrainer.save_model): EMA in fp16, model None,
    optimizer state, train_args, metadata; the model carries its training arguments (model.args)."""
    model.args = get_cfg(DEFAULT_CFG)
    optimizer = torch.optim.AdamW(model.parameters())
    return {"epoch": 0, "best_fitness": None, "model": None, "ema": deepcopy(model).half(), "updates": 0,
            "optimizer": optimizer.state_dict(), "train_args": vars(model.args), "train_metrics": {},
            "date": "2025-01-01T00:00:00", "version": "8.4", "license": "AGPL-3.0", "docs": "x"}


def test_allowlist_is_derived_from_real_checkpoints_complete_and_minimal():
    """Every global of every YOLO-World config in the trainer layout, plus the `ovdet train` output that ships as
    the demo model (with its text tower): their union is exactly ALLOWED_GLOBALS."""
    derived = set(pickle_globals(DEMO_FILE))
    for cfg in WORLD_CONFIGS:
        with _quiet_ultralytics():
            model = WorldModel(cfg, verbose=False)
        buffer = io.BytesIO()
        torch.save(trainer_layout(model), buffer)
        derived |= pickle_globals(buffer)
        del model, buffer
    assert derived - ALLOWED_GLOBALS == set(), "complete: a real checkpoint needs these"
    assert ALLOWED_GLOBALS - derived == set(), "minimal: no real checkpoint needs these"


def test_real_random_checkpoints_load_safely_with_the_same_detections(tmp_path, tiny_text_encoder):
    image = scene(240, 320, seed=4)
    for cfg in ("yolov8n-world.yaml", "yolov8n-worldv2.yaml"):
        path = tmp_path / cfg.replace(".yaml", ".pt")
        torch.save(trainer_layout(random_world_model(cfg, seed=1)), path)
        safe = OVDetector(path, text_model=tiny_text_encoder, device="cpu", imgsz=160)
        trusted = OVDetector(path, text_model=tiny_text_encoder, device="cpu", imgsz=160, trust_weights=True)
        for det in (safe, trusted):
            det.set_classes(["red thing", "blue thing", "box"])
        a, b = safe.detect(image, conf=0.01), trusted.detect(image, conf=0.01)
        assert len(a) > 0
        np.testing.assert_array_equal(a.xyxy, b.xyxy)
        np.testing.assert_array_equal(a.confidence, b.confidence)


# ---- crafted checkpoints: each would create `marker` when unpickled -------------------------------------------

class _Payload:
    def __init__(self, kind: str, marker: pathlib.Path):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        command = f"touch {self.marker}"
        if self.kind == "os.system":
            return os.system, (command,)
        if self.kind == "subprocess.Popen":
            return subprocess.Popen, (["touch", self.marker],)
        if self.kind == "builtins.exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        if self.kind == "builtins.eval":
            return eval, (f"open({self.marker!r}, 'w').close()",)
        if self.kind == "callable":  # a plain library function, no lambda
            return pathlib.Path.touch, (pathlib.Path(self.marker),)
        if self.kind == "allowed-class":
            # an *allowlisted* class called with arguments of the file's choosing: ultralytics' builder evals the
            # config's `activation`. torch.load(weights_only=True) + add_safe_globals would run this.
            cfg = {"activation": f"__import__('os').system('touch {self.marker}') or nn.SiLU()",
                   "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Conv", [16, 3, 2]]]}
            return WorldModel, (cfg,)
        raise ValueError(self.kind)


KINDS = ["os.system", "subprocess.Popen", "builtins.exec", "builtins.eval", "callable", "allowed-class"]


def craft(tmp_path: pathlib.Path, kind: str) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / f"marker-{kind}"
    path = tmp_path / f"evil-{kind.replace('.', '-')}.pt"
    torch.save({"model": _Payload(kind, marker), "train_args": {}}, path)
    return path, marker


def _wait_gone(marker: pathlib.Path, before: set[int]) -> bool:
    """Whether the payload stayed unrun. Popen would run `touch` in a child process, so first every child started since
    `before` (pids) has exited; then the marker tells (no guessed delay: a child not yet reaped is still listed)."""
    started = [child for child in psutil.Process().children() if child.pid not in before]
    psutil.wait_procs(started, timeout=30)
    return not marker.exists()


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children()}


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_checkpoint_is_refused_by_every_load_path(tmp_path, kind, capsys, tiny_text_encoder):
    path, marker = craft(tmp_path, kind)
    before = _children()
    if kind != "allowed-class":
        with pytest.raises(WeightsUnsafeError) as exc:
            load_checkpoint(path)
        assert exc.value.names and "--trust-weights" in str(exc.value) and "only for files you trust" in str(exc.value)
        assert exc.value.names[0] in str(exc.value)
    loaders = {
        "OVDetector": lambda: OVDetector(path, text_model=tiny_text_encoder, device="cpu"),
        "load_world_checkpoint": lambda: load_world_checkpoint(path),
        "weights import": lambda: import_weights(path, name="evil"),
        "weights convert": lambda: convert_to_safetensors(path, tmp_path / "converted"),
    }
    for name, load in loaders.items():
        with pytest.raises((WeightsUnsafeError, WeightsCorruptError)):
            load()
        assert _wait_gone(marker, before), f"{name} ran code from the file"
    assert not (weights_dir() / "evil.pt").exists() and not (tmp_path / "converted.safetensors").exists()
    for argv in (["detect", str(tmp_path), "--model", str(path), "--classes", "person", "--device", "cpu"],
                 ["weights", "import", str(path)],
                 ["train", str(tmp_path / "data.yaml"), "--classes-from-data", "--model", str(path),
                  "--out", str(tmp_path / "run"), "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ovdet: error:") and "Traceback" not in err
        assert _wait_gone(marker, before), f"ovdet {argv[0]} ran code from the file"


@pytest.mark.parametrize("kind", ["os.system", "callable", "allowed-class"])
def test_trust_weights_is_the_old_behaviour(tmp_path, kind, tiny_text_encoder):
    path, marker = craft(tmp_path, kind)
    try:
        with pytest.raises(Exception):  # the payload runs, then the file is not a usable model
            OVDetector(path, text_model=tiny_text_encoder, device="cpu", trust_weights=True)
        assert marker.exists(), "trust_weights=True loads with plain pickle, as before"
    finally:
        marker.unlink(missing_ok=True)


def test_safe_globals_would_not_have_been_enough(tmp_path):
    """Why ovdet has its own unpickler: with weights_only=True, an allowlisted class may be called by the file."""
    path, marker = craft(tmp_path, "allowed-class")
    try:
        with torch.serialization.safe_globals([WorldModel]), _quiet_ultralytics():
            with pytest.raises(Exception):
                torch.load(path, weights_only=True)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)
    with pytest.raises((WeightsCorruptError, WeightsUnsafeError)):
        load_world_checkpoint(path)
    assert not marker.exists()


def test_torchscript_and_non_model_files(tmp_path):
    traced = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    script = tmp_path / "script.pt"
    torch.jit.save(traced, str(script))
    with pytest.raises(WeightsUnsafeError, match="TorchScript"):
        load_world_checkpoint(script)
    tensors = tmp_path / "tensors.pt"
    torch.save({"weight": torch.zeros(3)}, tensors)
    with pytest.raises(WeightsCorruptError, match="neither a YOLO-World checkpoint nor a CLIP text tower"):
        import_weights(tensors)
    assert not (weights_dir() / "tensors.pt").exists()


def test_import_accepts_a_world_checkpoint(tiny_world_checkpoint):
    dest = import_weights(tiny_world_checkpoint, name="mine")
    assert dest == weights_dir() / "mine.pt" and dest.read_bytes() == tiny_world_checkpoint.read_bytes()


# ---- safetensors pairs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ["yolov8n-world.yaml", "yolov8n-worldv2.yaml"])
def test_safetensors_round_trip_gives_identical_detections(tmp_path, cfg, tiny_text_encoder):
    pt = tmp_path / "m.pt"
    save_world_checkpoint(random_world_model(cfg, seed=2), pt)
    weights = convert_to_safetensors(pt)
    assert weights == tmp_path / "m.safetensors" and (tmp_path / "m.json").is_file()
    assert b"pickle" not in weights.read_bytes()[:64]
    image = scene(240, 320, seed=5)
    results = []
    for source in (pt, weights):
        det = OVDetector(source, text_model=tiny_text_encoder, device="cpu", imgsz=160)
        det.set_classes(["a", "b", "c"])
        results.append(det.detect(image, conf=0.01))
    assert len(results[0]) > 0
    np.testing.assert_array_equal(results[0].xyxy, results[1].xyxy)
    np.testing.assert_array_equal(results[0].confidence, results[1].confidence)
    np.testing.assert_array_equal(results[0].class_id, results[1].class_id)


def test_cli_convert_keeps_the_embedded_text_tower(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["weights", "convert", str(DEMO_FILE), "--out", str(out)]) == 0
    assert "demo.safetensors" in capsys.readouterr().out
    classes = "red circle,blue square,green triangle"
    lines = []
    for model in ("demo", str(out) + ".safetensors"):
        assert main(["detect", "samples/shapes.jpg", "--model", model, "--classes", classes, "--json",
                     "--device", "cpu"]) == 0
        lines.append(json.loads(capsys.readouterr().out)["detections"])
    assert lines[0] and lines[0] == lines[1]


def test_pair_config_cannot_run_code(tmp_path, tiny_world_checkpoint):
    weights = convert_to_safetensors(tiny_world_checkpoint, tmp_path / "m")
    config = weights.with_suffix(".json")
    meta = json.loads(config.read_text())
    marker = tmp_path / "marker"
    for key, value in (("activation", f"__import__('os').system('touch {marker}')"),
                       ("yaml_file", "https://example.com/evil.yaml")):
        bad = deepcopy(meta)
        bad["config"][key] = value
        config.write_text(json.dumps(bad))
        if key == "activation":
            with pytest.raises(WeightsUnsafeError, match="activation"):
                load_world_checkpoint(weights)
        else:  # dropped: the model is built from the config itself, never from a file or URL it names
            load_world_checkpoint(weights)
        assert not marker.exists()
    bad = deepcopy(meta)
    bad["config"]["backbone"][0][2] = "torch_safe_load"
    with pytest.raises(WeightsUnsafeError, match="torch_safe_load"):
        check_model_config(bad["config"], "x")
    config.unlink()
    with pytest.raises(WeightsCorruptError, match="m.json"):
        load_world_checkpoint(weights)


def test_published_sha256_is_checked_on_load_and_cached(monkeypatch, tmp_path):
    from ovdet.weights import registry as w

    fake = w.weights_dir() / "ViT-B-32.pt"
    fake.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": torch.zeros(1)}, fake)
    monkeypatch.setattr(w, "_hf_snapshot", lambda repo: None)
    calls = []
    from ovdet.util import hashing

    real = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda p: calls.append(p) or real(p))
    for _ in range(2):
        with pytest.raises(WeightsCorruptError, match="not the published ViT-B-32.pt"):
            w.resolve_text_model(None)
    assert len(calls) == 1, "the digest is remembered by size + mtime"
    os.utime(fake, ns=(1, 1))
    with pytest.raises(WeightsCorruptError):
        w.resolve_text_model(None)
    assert len(calls) == 2


# ---- OpenAI-format TorchScript text towers, read without TorchScript ------------------------------------------

class Block(torch.nn.Module):
    """An OpenAI-CLIP residual block; `attn_mask` is a plain tensor attribute, which is no part of the state dict."""

    def __init__(self, width: int):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        self.attn_mask = torch.full((8, 8), float("-inf")).triu(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Resblocks(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.resblocks = torch.nn.Sequential(*[Block(width) for _ in range(layers)])
        self.layers = layers  # an int attribute, kept by torch.jit.script

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class TinyClipText(torch.nn.Module):
    """OpenAI CLIP's text tower layout at toy size, scripted (not traced) so every kind of attribute is saved."""

    def __init__(self, width: int = 16, layers: int = 2):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(50, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(8, width))
        self.transformer = Resblocks(width, layers)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, 12))
        self.register_buffer("logit_scale", torch.tensor(4.6))
        self.shape = [8, width]  # a list attribute

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


def test_torchscript_clip_weights_are_read_without_torchscript_and_equal_jit_loads(tmp_path, monkeypatch):
    from ovdet.weights.scriptstate import torchscript_state_dict
    from ovdet.weights.torchzip import opened

    torch.manual_seed(0)
    path = tmp_path / "ViT-tiny.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(TinyClipText().half()), str(path))  # OpenAI's files are fp16
        reference = torch.jit.load(str(path)).state_dict()
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    with opened(path) as archive:
        assert archive.torchscript_marks()
        ours = torchscript_state_dict(archive)
    assert list(ours) == list(reference) and "transformer.resblocks.1.attn_mask" not in ours
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype == torch.float16 and torch.equal(ours[name], tensor), name
