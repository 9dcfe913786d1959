"""README's Troubleshooting quotes real messages: each quoted one is triggered here and found in what ovdet prints."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ovdet.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHAPES = str(ROOT / "samples" / "shapes.jpg")


def quoted_messages() -> list[str]:
    """The `**`message`**` quotes of README's Troubleshooting section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Troubleshooting\n"):]
    section = section[:section.index("\n## ", 1)]
    return [re.sub(r"\s+", " ", q) for q in re.findall(r"\*\*`(.+?)`\*\*", section, flags=re.S)]


def _pickled_system(tmp: Path) -> str:
    """A torch zip checkpoint whose data.pkl calls os.system on load (it is never loaded: ovdet refuses it)."""
    class Payload:
        def __reduce__(self):
            import os
            return (os.system, ("true",))

    plain = tmp / "plain.pt"
    torch.save({"x": 1}, plain)
    with zipfile.ZipFile(plain) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data = next(name for name in entries if name.endswith("data.pkl"))
    entries[data] = pickle.dumps({"model": Payload()}, protocol=2)
    evil = tmp / "evil.pt"
    with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as out:
        for name, payload in entries.items():
            out.writestr(name, payload)
    return str(evil)


def _truncated(tmp: Path) -> str:
    path = tmp / "truncated.pt"
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(64)}, buf)
    path.write_bytes(buf.getvalue()[:100])
    return str(path)


TRIGGERS: dict[str, Callable[[Path], list[str]]] = {
    "Detector file 'yolov8s-worldv2.pt' was not found":
        lambda tmp: ["detect", SHAPES, "--model", "yolov8s-worldv2", "--classes", "x"],
    "was refused: unpickling it would use posix.system":
        lambda tmp: ["detect", SHAPES, "--model", _pickled_system(tmp), "--classes", "x"],
    "cannot be used as model weights: it is not a zip archive":
        lambda tmp: ["detect", SHAPES, "--model", _truncated(tmp), "--classes", "x"],
    "Cannot open camera 7":
        lambda tmp: ["webcam", "--source", "7", "--model", "demo", "--classes", "x", "--no-window"],
    "class list at [1]: class 'a' is listed twice":
        lambda tmp: ["detect", SHAPES, "--model", "demo", "--classes", "a,a"],
}


def test_every_quoted_message_has_a_trigger():
    quotes = quoted_messages()
    assert len(quotes) == len(TRIGGERS), quotes
    for quote in quotes:
        assert sum(key in quote for key in TRIGGERS) == 1, f"no (or more than one) trigger for {quote!r}"


@pytest.mark.parametrize("quote", quoted_messages())
def test_the_quoted_message_is_what_ovdet_prints(quote, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVDET_OFFLINE", "1")
    argv = next(trigger for key, trigger in TRIGGERS.items() if key in quote)(tmp_path)
    assert main(argv) == 2
    printed = re.sub(r"\s+", " ", capsys.readouterr().err)
    assert "ovdet: error: " in printed
    position = 0
    for part in (p.strip() for p in quote.split("...")):  # "..." in a quote stands for a path or details
        found = printed.find(part, position)
        assert found >= 0, f"README quotes {part!r}, ovdet printed: {printed}"
        position = found + len(part)
