"""Behaviours that tools/mutation_check.py found no test for: the journal reaches the disk, an image's val split does
not depend on which other images are in the folder, the compiled-model cache keeps models apart, and the restricted
unpickler refuses on its own what its pre-scan refuses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ovdet import annotate_folder
from test_annotate import CLASSES, FakeDetector, make_images


def test_annotate_fsyncs_the_journal_and_the_error_log(tmp_path, monkeypatch):
    """A kill -9 keeps every finished line (the page cache survives the process), a power loss only what was
    fsynced: the journal must be fsynced at checkpoints and at the end, after its last line."""
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.basename(path), os.fstat(fd).st_size))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    src, out = tmp_path / "src", tmp_path / "out"
    make_images(src, 5)
    (src / "broken.jpg").write_bytes(b"not an image")
    annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=2, quiet=True)
    journal_size = (out / "predictions.jsonl").stat().st_size
    assert ("predictions.jsonl", journal_size) in synced  # synced whole, after the last image
    assert ("errors.jsonl", (out / "errors.jsonl").stat().st_size) in synced


def _val_images(out: Path) -> set[str]:
    """The input-relative paths of the images in the YOLO val list (via the journal's keys)."""
    import json

    image_of = {}
    for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        image_of[rec["key"]] = rec["image"]
    lines = (out / "yolo" / "val.txt").read_text(encoding="utf-8").splitlines()
    return {image_of[Path(line).stem] for line in lines}


def test_an_images_split_does_not_depend_on_the_other_images(tmp_path):
    """The same images in two folders, one with extra images sorted before and between them: each shared image is
    in the same split in both runs (expected values come from the first run, not from the split code)."""
    full = tmp_path / "full"
    rels = make_images(full, 24, size=(48, 64))
    part = tmp_path / "part"
    kept = rels[::2]
    for rel in kept:
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / rel, part / rel)
    for i in range(6):  # extra images that sort before and among the shared ones
        shutil.copy(full / rels[1], part / f"a{i:02d}.jpg")
        shutil.copy(full / rels[3], part / f"img{i * 4:03d}b.jpg")
    annotate_folder(full, CLASSES, tmp_path / "out_full", detector=FakeDetector(), batch=3, quiet=True,
                    val_split=0.4)
    annotate_folder(part, CLASSES, tmp_path / "out_part", detector=FakeDetector(), batch=5, quiet=True,
                    val_split=0.4)
    val_full, val_part = _val_images(tmp_path / "out_full"), _val_images(tmp_path / "out_part")
    assert 0 < len(val_full) < len(rels)
    assert {r for r in kept if r in val_full} == {r for r in kept if r in val_part}


def test_the_compiled_model_cache_keeps_two_models_of_one_name_apart(tmp_path, monkeypatch):
    """Two different weights under the same model name share one OVDET_HOME: each OpenVINO detector computes what
    the torch path computes on its own weights (a cache key without the weights would serve the first's file)."""
    import torch

    from conftest import random_embeddings, random_world_model, scene
    from ovdet.model.world import WorldDetector

    monkeypatch.setenv("OVDET_HOME", str(tmp_path / "home"))
    images = [scene(96, 128, seed=1)]
    outputs = []
    for seed in (0, 1):
        dets = {name: WorldDetector(random_world_model("yolov8n-worldv2.yaml", seed=seed), "tiny", device="cpu",
                                    backend=name) for name in ("torch", "openvino")}
        with torch.inference_mode():
            for det in dets.values():
                det.set_text_embeddings(random_embeddings(3, seed=2))
            ref, got = (det.backend.run(det.preprocess(images, 96), det._txt_feats) for det in dets.values())
        torch.testing.assert_close(got[:, :4], ref[:, :4], rtol=0, atol=1e-2)
        torch.testing.assert_close(got[:, 4:], ref[:, 4:], rtol=0, atol=1e-4)
        outputs.append(ref)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-2)  # the two weights do differ


@pytest.mark.parametrize("name", ["builtins.getattr", "builtins.eval", "builtins.exec", "posix.system", "os.system",
                                  "subprocess.Popen", "torch.load"])
def test_the_restricted_unpickler_itself_refuses_globals_outside_the_allowlist(name):
    """The pre-scan refuses such a pickle first, so only a direct call shows that the unpickler's own allowlist
    (the second line of defence) is the same one: a GLOBAL opcode naming `name`, nothing else."""
    from ovdet.weights.safepickle import Refused, RestrictedUnpickler
    from ovdet.weights.torchzip import TorchArchive

    module, attr = name.rsplit(".", 1)
    data = b"\x80\x02c" + module.encode() + b"\n" + attr.encode() + b"\n."  # PROTO 2, GLOBAL module name, STOP
    with pytest.raises(Refused) as refused:
        RestrictedUnpickler(data, TorchArchive("crafted.pt", None, {})).load()
    assert refused.value.names == [name]
