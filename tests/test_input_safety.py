"""Files other than checkpoints that ovdet reads (journals, class files, text towers, cache entries, output folders):
none may run code or make ovdet write outside its output folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ovdet.cli import main
from ovdet.text.cache import EmbeddingCache
from ovdet.errors import ClassSpecError, WeightsCorruptError
from ovdet.text.prompts import parse_classes
from ovdet.text.tower import TextEncoder

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "shapes"
CLASSES = "red circle,blue square"


class _Touch:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A real `ovdet annotate` run (demo model) over two sample images."""
    root = tmp_path_factory.mktemp("annotated")
    src = root / "src"
    src.mkdir()
    for image in sorted(SAMPLES.glob("*.jpg"))[:2]:
        shutil.copy(image, src / image.name)
    out = root / "run"
    assert main(["annotate", str(src), "--model", "demo", "--classes", CLASSES, "--out", str(out),
                 "--format", "yolo,jsonl", "--device", "cpu", "--quiet"]) == 0
    return out


def _tampered(run_folder: Path, tmp_path: Path, key: str) -> Path:
    run = tmp_path / "deep" / "er" / "run"
    shutil.copytree(run_folder, run, symlinks=True)
    journal = run / "predictions.jsonl"
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    lines[0]["key"] = key
    journal.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return run


@pytest.mark.parametrize("key", ["../../../escaped", "/tmp/escaped-abs", "..", "a\\..\\..\\escaped"])
def test_journal_keys_cannot_name_files_outside_the_output(run_folder, tmp_path, capsys, key):
    run = _tampered(run_folder, tmp_path, key)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["relabel", str(run), "--out", str(tmp_path / "deep" / "new"), "--format", "yolo"]) == 2
    assert "not a plain file name" in capsys.readouterr().err
    assert main(["report", str(run), "--quiet"]) == 2
    assert "not a plain file name" in capsys.readouterr().err
    created = [p for p in tmp_path.rglob("*") if p not in before and "escaped" in p.name]
    assert created == [] and not Path("/tmp/escaped-abs.txt").exists()


def _resume(src: Path, run: Path) -> int:
    """The same annotate command again, into a copy of the run folder (a resume)."""
    return main(["annotate", str(src), "--model", "demo", "--classes", CLASSES, "--out",
                 str(run), "--format", "yolo,jsonl", "--device", "cpu", "--quiet"])


def test_symlinked_output_subfolder_is_refused(run_folder, tmp_path, capsys):
    run = tmp_path / "copy" / "run"
    shutil.copytree(run_folder, run, symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "yolo", elsewhere)
    before = sorted(p.name for p in elsewhere.rglob("*"))
    (run / "yolo").symlink_to(elsewhere, target_is_directory=True)
    assert _resume(run_folder.parent / "src", run) == 2 and "symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in elsewhere.rglob("*")) == before


def test_symlinked_journal_is_refused(run_folder, tmp_path, capsys):
    run = tmp_path / "copy" / "run"
    shutil.copytree(run_folder, run, symlinks=True)
    target = tmp_path / "precious.jsonl"
    shutil.move(run / "predictions.jsonl", target)
    content = target.read_bytes()
    (run / "predictions.jsonl").symlink_to(target)
    assert _resume(run_folder.parent / "src", run) == 2 and "symbolic link" in capsys.readouterr().err
    assert target.read_bytes() == content


def test_class_file_cannot_run_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "classes.yaml"
    path.write_text(f"classes:\n  - !!python/object/apply:os.system ['touch {marker}']\n  - person\n")
    with pytest.raises(ClassSpecError):
        parse_classes(str(path))
    assert not marker.exists()


def test_text_tower_file_cannot_run_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "ViT-B-32.pt"
    torch.save({"state_dict": _Touch(marker)}, path)
    with pytest.raises(WeightsCorruptError):
        TextEncoder.load(path)
    assert not marker.exists()


def test_embedding_cache_entries_are_data_not_pickles(tmp_path):
    marker = tmp_path / "marker"
    cache = EmbeddingCache(tmp_path / "cache")
    cache.put("tower@x", ["cat"], torch.ones(1, 4))
    entries = [p for p in (tmp_path / "cache" / "prompts").rglob("*") if p.is_file()]
    assert entries
    for path in entries:
        path.write_bytes(pickle.dumps(_Touch(marker)))
    assert cache.get("tower@x", ["cat"]) == {}  # a foreign entry is dropped and re-encoded, never unpickled
    assert not marker.exists()
