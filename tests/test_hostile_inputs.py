"""Hostile class files and file names: caps checked before any encoding, control characters never reach a terminal
raw, and an odd image name (backslash, newline, ESC, undecodable bytes, a long path) never ends an annotate run."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from unittest import mock
from xml.etree import ElementTree

import pytest
import yaml

from ovdet.cli import main
from ovdet.util.display import UNSAFE, json_shown, shown
from ovdet.text.cache import LazyTextEncoder
from ovdet.errors import ClassSpecError
from ovdet.datasets.keys import KEY_BYTES, flat_key
from ovdet.util.progress import LineProgress, progress
from ovdet.text.prompts import ClassEntry, ClassSpec, parse_classes
from ovdet.text.tower import TextEncoder
from ovdet.runs.write_errors import output_write_error

SAMPLE = sorted((Path(__file__).resolve().parents[1] / "samples" / "shapes").glob("*.jpg"))[0]
CLASSES = "red circle,blue square"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")  # ESC, BEL, C1 CSI, right-to-left override: none may be printed raw


def big_class_file(tmp_path: Path, classes: int = 300, templates: int = 300) -> Path:
    """A small YAML file that multiplies: classes × templates prompts to encode."""
    lines = ["templates:"] + [f"  - 't{i} {{}}'" for i in range(templates)]
    lines += ["classes:"] + [f"  - c{i}" for i in range(classes)]
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def encoded(monkeypatch):
    """A counting stand-in for both text towers' encode: records how many texts each call asked for."""
    calls: list[int] = []

    def count(self, prompts, *args, **kwargs):
        import torch

        calls.append(len(prompts))
        return torch.nn.functional.normalize(torch.randn(len(prompts), 512), dim=-1)

    monkeypatch.setattr(LazyTextEncoder, "encode", count)
    monkeypatch.setattr(TextEncoder, "encode", count)
    return calls


def assert_nothing_raw(text: str) -> None:
    assert not any(c in text for c in RAW), f"raw control character printed: {text!r}"


# ---------------------------------------------------------------- caps on class specs

def test_multiplying_class_file_is_refused_before_any_encoding(tiny_detector, tmp_path, capsys, encoded):
    big = big_class_file(tmp_path)
    assert big.stat().st_size < 7000  # ~6.7 KB asking for 90,000 encodings
    began = time.perf_counter()
    with pytest.raises(ClassSpecError, match=r"90000 prompts \(300 phrasings × 300 templates\).*cap of 8192.*"
                                             r"OVDET_MAX_PROMPTS=N \(N ≥ 90000\)"):
        tiny_detector.set_classes(big)
    assert main(["classes", "encode", str(big), "--device", "cpu"]) == 2
    assert "90000 prompts" in capsys.readouterr().err
    assert time.perf_counter() - began < 20  # a hang guard: encoding 90,000 prompts would take minutes
    assert encoded == []
    tiny_detector.set_classes(["a", "b"], templates=True)  # the stand-in does see encodings: 2 × 7 templates
    assert encoded == [14]


def test_alias_multiplied_class_file_stops_at_the_cap(tmp_path, encoded):
    """YAML aliases make a 120 KB file name 25 million phrasings; parsing stops at the cap, not at the end."""
    words = ", ".join(f"w{j}" for j in range(5000))
    lines = [f"  - {{name: c0, synonyms: &w [{words}]}}"] + [f"  - {{name: c{i}, synonyms: *w}}" for i in range(1, 5000)]
    path = tmp_path / "aliases.yaml"
    path.write_text("classes:\n" + "\n".join(lines) + "\n", encoding="utf-8")
    began = time.perf_counter()
    with pytest.raises(ClassSpecError, match=r"aliases\.yaml:3 at classes\[1\]: .*at least 10002 prompts"):
        parse_classes(path)
    assert time.perf_counter() - began < 20  # a hang guard: going through every alias takes minutes
    assert encoded == []


@pytest.mark.parametrize("spec, message, env, raised", [
    ([f"c{i}" for i in range(2001)], r"at least 2001 classes, more than the cap of 2000.*OVDET_MAX_CLASSES=N",
     "OVDET_MAX_CLASSES", "2001"),
    ({"templates": [f"t{i} {{}}" for i in range(100)], "classes": [f"c{i}|d{i}" for i in range(41)]},
     r"8200 prompts \(82 phrasings × 100 templates\), more than the cap of 8192.*OVDET_MAX_PROMPTS=N",
     "OVDET_MAX_PROMPTS", "8200"),
    (["x" * 1001], r"1001 characters long, more than the cap of 1000.*OVDET_MAX_PROMPT_CHARS=1001",
     "OVDET_MAX_PROMPT_CHARS", "1001"),
    ({"templates": ["a {} " + "y" * 1000], "classes": ["car"]}, r"template .* 1005 characters long",
     "OVDET_MAX_PROMPT_CHARS", "1005"),
])
def test_caps_name_the_count_the_cap_and_how_to_raise_it(monkeypatch, spec, message, env, raised):
    with pytest.raises(ClassSpecError, match=message):
        parse_classes(spec)
    monkeypatch.setenv(env, raised)
    assert parse_classes(spec).classes  # the variable raises the cap; just under the new cap is fine


def test_cap_variables_must_be_positive_numbers(monkeypatch):
    for bad in ("many", "0", "-5", "\x1b[31m"):
        monkeypatch.setenv("OVDET_MAX_PROMPTS", bad)
        with pytest.raises(ClassSpecError, match="OVDET_MAX_PROMPTS=.* is not a positive whole number") as info:
            parse_classes(["car"])
        assert_nothing_raw(str(info.value))


def test_specs_built_in_code_meet_the_caps(monkeypatch, encoded):
    spec = ClassSpec(tuple(ClassEntry(f"c{i}", (f"c{i}",)) for i in range(20)), templates=("{}", "a {}"))
    monkeypatch.setenv("OVDET_MAX_PROMPTS", "39")
    with pytest.raises(ClassSpecError, match="40 prompts"):
        parse_classes(spec)
    with pytest.raises(ClassSpecError, match="40 prompts"):  # embed checks too: a spec that skipped parsing
        spec.embed(lambda texts: LazyTextEncoder.encode(None, texts))
    assert encoded == []


# ---------------------------------------------------------------- control characters shown escaped

@pytest.mark.parametrize("classes, shown_as", [
    ("red\x1b[31m,blue", r"'red\x1b[31m'"),
    ("car,\x1b]0;title\x07", r"'\x1b]0;title\x07'"),
    ("car|\x9b2J", r"'\x9b2J'"),
    ("!evil\u202egpj.exe", r"'evil\u202egpj.exe'"),
])
def test_control_characters_in_classes_are_refused_and_shown_escaped(capsys, classes, shown_as):
    assert main(["classes", "show", classes]) == 2
    out, err = capsys.readouterr()
    assert_nothing_raw(out + err)
    assert shown_as in err and "control character" in err and "Remove it" in err


def test_control_characters_in_class_files_and_code_built_specs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('classes:\n  - name: "a\\u001b[2Jb"\n  - car\n', encoding="utf-8")
    with pytest.raises(ClassSpecError, match=r"c\.yaml:2 at classes\[0\]: .*\\x1b\[2J") as info:
        parse_classes(path)
    assert_nothing_raw(str(info.value))
    hostile = ClassSpec((ClassEntry("ok", ("ok", "new\nline")),), negatives=("\u202e",))
    with pytest.raises(ClassSpecError, match=r"'new\\nline'"):
        parse_classes(hostile)
    table = ClassSpec((ClassEntry("a\x1b[2J", ("a\x1b[2J",)),), negatives=("\u202e",)).describe()
    assert_nothing_raw(table)
    assert r"a\x1b[2J" in table and r"\u202e" in table


def test_shown_escapes_only_what_a_terminal_would_obey():
    assert shown("a\x1b[31mb\x07\x9b\x7f\u202e\u2066\u2028\n\t") == r"a\x1b[31mb\x07\x9b\x7f\u202e\u2066\u2028\n\t"
    assert shown(os.fsdecode(b"bad\xff.jpg")) == r"bad\xff.jpg"  # an undecodable byte of a file name
    assert shown(Path(os.fsdecode(b"/x/\xfe\x1b"))) == r"/x/\xfe\x1b"
    kind = "naïve 交通 灯 🚦 a\\b \u200d"
    assert shown(kind) == kind  # accents, CJK, emoji, backslash, zero-width joiner unchanged
    value = {"image": "e\x1b\x9b\u202e" + os.fsdecode(b"\xff.jpg"), "name": "交通"}
    dumped = json_shown(json.dumps(value, ensure_ascii=False))
    assert not UNSAFE.search(dumped) and json.loads(dumped) == value and "交通" in dumped


def test_progress_lines_and_messages_show_names_escaped():
    log = io.StringIO()
    with LineProgress(total=2, desc="scan \x1b]0;x\x07", file=log, interval=0) as bar:
        bar.update(1)
        bar.write("skipped \x1b[2Jevil.jpg")
    assert_nothing_raw(log.getvalue())
    assert r"scan \x1b]0;x\x07: 1/2" in log.getvalue() and r"skipped \x1b[2Jevil.jpg" in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with progress(total=1, desc="a\x1b[31m", file=term) as bar:
        bar.write("b\x1b[31m\u202e", file=term)
        bar.update(1)
    assert_nothing_raw(term.getvalue())
    assert r"a\x1b[31m" in term.getvalue() and r"b\x1b[31m\u202e" in term.getvalue()


def test_write_error_messages_show_names_escaped(tmp_path):
    folder = tmp_path / "out\x1b[31m"
    folder.mkdir()
    exc = OSError(errno.ENOSPC, "No space left on device", str(folder / "a\u202e.txt"))
    message = str(output_write_error(exc, folder, "The 3 images finished before this are safe."))
    assert_nothing_raw(message)
    assert r"out\x1b[31m" in message and r"a\u202e.txt" in message


def test_detect_shows_hostile_file_names_escaped(tmp_path, capsys):
    good = tmp_path / "shape\x1b[31m\u202e.jpg"
    shutil.copy(SAMPLE, good)
    broken = tmp_path / "broken\x1b]0;owned\x07.jpg"
    broken.write_bytes(b"not an image")
    args = ["detect", str(good), str(broken), "--model", "demo", "--classes", CLASSES, "--device", "cpu"]
    assert main(args) == 1  # one file skipped
    out, err = capsys.readouterr()
    assert_nothing_raw(out + err)
    assert r"shape\x1b[31m\u202e.jpg: " in out and r"skipped " in err and r"broken\x1b]0;owned\x07.jpg" in err
    assert main(args + ["--json"]) == 1
    out, err = capsys.readouterr()
    assert_nothing_raw(out + err)
    assert json.loads(out.splitlines()[0])["image"] == str(good)  # escaped for the terminal, same JSON value


# ---------------------------------------------------------------- odd file names in annotate

def test_flat_keys_are_plain_unique_and_short():
    used: set[str] = set()
    odd = ["a\\b.jpg", "a_b.jpg", "new\nline.jpg", "e\x1b[31m.jpg", os.fsdecode(b"bad\xff.jpg"), "A\\B.JPG",
           "d" * 120 + "/" + "x" * 240 + ".jpg", "d" * 120 + "/" + "x" * 239 + "y.jpg"]
    keys = [flat_key(rel, used) for rel in odd]
    assert keys[:6] == ["a_b", "a_b_jpg", "new_line", "e_[31m", "bad_", "A_B_jpg_2"]
    assert len({k.lower() for k in keys}) == len(keys)
    for key in keys:
        assert not UNSAFE.search(key) and "\\" not in key and "/" not in key
        assert len(key.encode("utf-8")) <= KEY_BYTES
        key.encode("utf-8")  # writable in UTF-8 files


def test_annotate_survives_odd_file_names(tmp_path, capsys):
    from pycocotools.coco import COCO
    import ultralytics.data.utils as du
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset

    src, out = tmp_path / "src", tmp_path / "out"
    long_rel = "d" * 120 + "/" + "x" * 240 + ".jpg"  # its flat name would pass the 255-byte name limit
    good = ["normal.jpg", "a\\b.jpg", "new\nline.jpg", "esc\x1b[31m\u202e.jpg", long_rel]
    for rel in good:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE, src / rel)
    undecodable = os.fsencode(src) + b"/bad\xff.jpg"
    shutil.copy(SAMPLE, undecodable)
    cmd = ["annotate", str(src), "--model", "demo", "--classes", CLASSES, "--out", str(out), "--format",
           "coco,yolo,jsonl,voc", "--device", "cpu"]

    assert main(cmd) == 0
    printed = "".join(capsys.readouterr())
    assert_nothing_raw(printed)
    assert re.search(r"annotated 5 images; 1 skipped \(see .*errors\.jsonl\)", printed)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["image"] for e in errors] == [r"bad\xff.jpg"] and "not valid UTF-8" in errors[0]["reason"]
    journal = (out / "predictions.jsonl").read_text(encoding="utf-8")
    recs = [json.loads(line) for line in journal.splitlines()]
    assert sorted(r["image"] for r in recs) == sorted(good)
    for rec in recs:
        assert not UNSAFE.search(rec["key"]) and "\\" not in rec["key"]
        link = out / "yolo" / "images" / (rec["key"] + ".jpg")
        assert os.path.samefile(link, src / rec["image"]) and (out / "yolo" / "labels" / f"{rec['key']}.txt").exists()
    assert sum(len(r["detections"]) for r in recs) > 0

    coco = COCO(str(out / "coco" / "annotations.json"))
    assert sorted(im["file_name"] for im in coco.loadImgs(coco.getImgIds())) == sorted(good)
    assert len(coco.getAnnIds()) == sum(len(r["detections"]) for r in recs)
    with mock.patch.object(du, "check_font", lambda *a, **k: None):
        data = du.check_det_dataset(str(out / "yolo" / "data.yaml"))
    assert data["names"] == dict(enumerate(CLASSES.split(",")))
    dataset = YOLODataset(img_path=data["train"], data=data, imgsz=64, augment=False, task="detect", hyp=get_cfg())
    assert len(dataset.labels) == 5
    assert yaml.safe_load((out / "yolo" / "data.yaml").read_text(encoding="utf-8"))["nc"] == 2
    voc = {p.stem: ElementTree.parse(p).getroot() for p in (out / "voc" / "Annotations").glob("*.xml")}
    assert set(voc) == {r["key"] for r in recs}  # every XML parses: control characters in paths shown escaped
    assert sorted(v.findtext("path") for v in voc.values()) == sorted(shown(src / r["image"]) for r in recs)

    capsys.readouterr()  # drop what pycocotools and ultralytics printed (ultralytics draws its own bar)
    assert main(cmd) == 0  # a resume reads the journal back: nothing redone, the undecodable name still listed
    assert_nothing_raw("".join(capsys.readouterr()))
    assert (out / "predictions.jsonl").read_text(encoding="utf-8") == journal
    assert [json.loads(line)["image"] for line in (out / "errors.jsonl").read_text().splitlines()] == [r"bad\xff.jpg"]
