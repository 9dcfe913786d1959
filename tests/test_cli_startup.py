"""What the `ovdet` command imports before it works: help and --version without torch, a warm cache without CLIP."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import ovdet.version
from ovdet.cli import COMMANDS, main
from ovdet.weights.registry import DEMO_FILE

REPO = Path(__file__).resolve().parents[1]
# Libraries that take seconds and hundreds of megabytes to import; the parser and --help need none of them.
HEAVY = ("torch", "ultralytics", "transformers", "cv2", "openvino", "supervision", "onnxruntime", "ray")
CLIP_MODELLING = "transformers.models.clip.modeling_clip"


def run_python(code: str, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter (this test process has torch loaded already); it prints one JSON line
    last, which is returned."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parser_and_help_import_no_heavy_library():
    """Fails when any CLI module (or a light module it imports) gains a top-level torch / cv2 / ... import."""
    found = run_python(f"""
import contextlib, io, json, sys
from ovdet.cli import build_parser, main

HEAVY = {HEAVY!r}
loaded = {{}}
build_parser()
loaded["build_parser"] = [m for m in HEAVY if m in sys.modules]
helps = [["--help"], *([name, "--help"] for name in {COMMANDS!r})]  # "detect --help" among them
for argv in helps:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert "usage: ovdet" in out.getvalue(), argv
    loaded[" ".join(argv)] = [m for m in HEAVY if m in sys.modules]
print(json.dumps(loaded))
""")
    assert found["build_parser"] == []
    assert {argv: mods for argv, mods in found.items() if mods} == {}
    assert len(found) == len(COMMANDS) + 2 and "detect --help" in found  # every command's help was shown


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"ovdet {version('ovdet')}\n"


def test_version_falls_back_to_the_package_version(monkeypatch, capsys):
    """A source tree that was never installed has no distribution metadata: ovdet.__version__ is shown."""
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(ovdet.version, "__version__", "9.8.7")
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == "ovdet 9.8.7\n"


@pytest.mark.skipif(not DEMO_FILE.is_file(),
                    reason=f"demo model {DEMO_FILE} is absent: build it with `python scripts/build_demo_model.py`")
def test_warm_embedding_cache_skips_the_clip_text_model():
    """The first run encodes the prompt (CLIP's modelling code imported); the second reads it from the cache in
    this test's OVDET_HOME and never imports that code, with the same boxes."""
    detect = f"""
import contextlib, io, json, sys
from ovdet.cli import main

with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["detect", "samples/shapes.jpg", "--model", "demo", "--classes", "red circle", "--device", "cpu",
                 "--json"])
print(json.dumps({{"code": code, "out": out.getvalue(), "clip": {CLIP_MODELLING!r} in sys.modules}}))
"""
    cold = run_python(detect)
    warm = run_python(detect)
    assert cold["code"] == warm["code"] == 0
    assert cold["clip"] is True  # a cache miss loads the text tower: the check below can see the import
    assert warm["clip"] is False
    assert warm["out"] == cold["out"]
    assert json.loads(warm["out"])["detections"][0]["class"] == "red circle"
