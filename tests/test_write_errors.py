"""A full disk, a read-only or vanished output folder: a clear OutputWriteError, the journal whole, resume exactly once."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ovdet import annotate_folder
from ovdet.cli import main
from ovdet.errors import OutputWriteError
from ovdet.runs.write_errors import output_write_error
from test_annotate import CLASSES, FakeDetector, assert_exactly_once, journal, make_images, snapshot

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class DiskFull:
    """Counts every write-type operation into `root` and, from operation `fail_at` on, fails it with ENOSPC.

    Operations: opening a file for writing, each write() on it, os.open for writing, os.write/os.pwrite
    (the first failing one writes half its bytes, as a filling disk does), os.fsync, os.replace, os.symlink,
    os.link and os.mkdir, with a path or with a name in a folder's fd (dir_fd=), and write() on a file object
    opened on a counted fd. Once the disk is "full" it stays full until `free()`.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, fail_at: int | None = None):
        self.root = str(root.resolve())
        self.fail_at = fail_at
        self.ops: list[str] = []
        self.fds: dict[int, str] = {}
        self.active = True
        self.partial_done = False
        real = {name: getattr(os, name) for name in ("open", "write", "pwrite", "fsync", "replace", "symlink",
                                                     "link", "mkdir", "close")}
        real_open = builtins.open
        this = self

        def resolved(path, dir_fd=None) -> str:
            """The absolute path an operation names, also one given relative to a folder's fd (dir_fd=)."""
            path = os.fsdecode(path)
            if dir_fd is not None and not os.path.isabs(path):
                return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            return os.path.abspath(path)

        def ours(path, dir_fd=None) -> bool:
            try:
                p = resolved(path, dir_fd)
            except (TypeError, OSError):
                return False
            return this.active and (p == this.root or p.startswith(this.root + os.sep))

        class File:
            def __init__(self, fh, path, fd=None):
                self._fh, self._path, self._fd = fh, path, fd

            def close(self):
                this.fds.pop(self._fd, None)  # the fd number may be reused for a file that is not ours
                self._fh.close()

            def write(self, data):
                if this.hit(f"write {self._path}"):
                    self._fh.write(data[: len(data) // 2])
                    self._fh.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
                return self._fh.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def __getattr__(self, name):
                return getattr(self._fh, name)

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, int) and file in this.fds and any(c in mode for c in "wax+"):
                # a file object on an fd that os.open made (the fd's open was counted): count its writes
                return File(real_open(file, mode, *args, **kwargs), this.fds[file], file)
            if isinstance(file, int) or not ours(file) or not any(c in mode for c in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            this.check(f"open {file}", file)
            return File(real_open(file, mode, *args, **kwargs), os.fspath(file))

        def fake_os_open(path, flags, *args, **kwargs):
            if ours(path, kwargs.get("dir_fd")) and flags & _WRITE_FLAGS:
                this.check(f"os.open {path}", path)
                fd = real["open"](path, flags, *args, **kwargs)
                this.fds[fd] = resolved(path, kwargs.get("dir_fd"))
                return fd
            return real["open"](path, flags, *args, **kwargs)

        def fake_write(fd, data, *rest):
            name = "pwrite" if rest else "write"
            if fd in this.fds and this.active and this.hit(f"{name} {this.fds[fd]}"):
                if not this.partial_done and len(data) > 1:  # a filling disk takes part of the data first
                    this.partial_done = True
                    return real[name](fd, bytes(data[: len(data) // 2]), *rest)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real[name](fd, data, *rest)

        def fake_fsync(fd):
            if fd in this.fds:
                this.check(f"fsync {this.fds[fd]}")
            return real["fsync"](fd)

        def fake_close(fd):
            this.fds.pop(fd, None)
            return real["close"](fd)

        def two_paths(name):
            def fake(src, dst, *args, **kwargs):
                if ours(dst, kwargs.get("dst_dir_fd", kwargs.get("dir_fd"))):
                    this.check(f"{name} {dst}", dst)
                return real[name](src, dst, *args, **kwargs)
            return fake

        def fake_mkdir(path, *args, **kwargs):
            if ours(path, kwargs.get("dir_fd")):
                this.check(f"mkdir {path}", path)
            return real["mkdir"](path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "write", lambda fd, data: fake_write(fd, data))
        monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: fake_write(fd, data, offset))
        monkeypatch.setattr(os, "fsync", fake_fsync)
        monkeypatch.setattr(os, "close", fake_close)
        monkeypatch.setattr(os, "replace", two_paths("replace"))
        monkeypatch.setattr(os, "symlink", two_paths("symlink"))
        monkeypatch.setattr(os, "link", two_paths("link"))
        monkeypatch.setattr(os, "mkdir", fake_mkdir)

    def hit(self, what: str) -> bool:
        """Count an operation; True if it must fail."""
        self.ops.append(what)
        return self.fail_at is not None and len(self.ops) > self.fail_at

    def check(self, what: str, path=None) -> None:
        if self.hit(what):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else os.fspath(path))

    def free(self) -> None:
        self.active = False


def run(src: Path, out: Path, **kw):
    return annotate_folder(src, CLASSES, out, detector=FakeDetector(), batch=2, quiet=True, save_annotated=True,
                           checkpoint_s=0.0, val_split=0.5, **kw)  # the split's lists and files are written too


def assert_journal_whole(out: Path) -> int:
    """The journal holds whole lines only, each a record, no image twice; returns how many."""
    path = out / "predictions.jsonl"
    if not path.exists():
        return 0
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    images = [json.loads(line)["image"] for line in data.splitlines()]
    assert len(images) == len(set(images))
    return len(images)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 small images and 1 unreadable file, and the outputs of a clean run over them."""
    root = tmp_path_factory.mktemp("diskfull")
    src = root / "src"
    rels = make_images(src, 4, size=(48, 64))
    (src / "zz-bad.jpg").write_text("not an image")
    clean = root / "clean"
    run(src, clean)
    return src, set(rels), snapshot(clean)


def test_every_write_site_fails_cleanly_and_resumes_exactly_once(world, tmp_path, monkeypatch):
    src, rels, clean = world
    with monkeypatch.context() as mp:
        counter = DiskFull(mp, tmp_path)
        run(src, tmp_path / "count")
    total = len(counter.ops)
    kinds = {op.split(" ")[0] for op in counter.ops}
    assert total > 30 and kinds >= {"mkdir", "os.open", "pwrite", "write", "replace", "symlink", "fsync"}
    for k in range(total):
        out = tmp_path / f"out{k}"
        with monkeypatch.context() as mp:
            disk = DiskFull(mp, tmp_path, fail_at=k)
            with pytest.raises(OutputWriteError) as info:
                run(src, out)
            disk.free()
        msg = str(info.value)
        where = counter.ops[k]
        assert "the disk is full" in msg and "ENOSPC" in msg, where
        assert "run the same command again: it resumes" in msg, where
        done = assert_journal_whole(out)
        assert (f"The {done} image" if done else "No image was finished") in msg, where
        assert not [p for p in out.rglob("*") if p.name.endswith(".ovdet-tmp")], where  # space given back
        summary = run(src, out)  # space freed: the same call resumes
        assert summary.images_already_done == done and summary.images_done == len(rels) - done, where
        assert_exactly_once(out, rels)
        assert snapshot(out) == clean, where


def test_cli_prints_one_clear_line_without_traceback(world, tmp_path, monkeypatch, capsys):
    src, rels, _ = world
    out = tmp_path / "out"
    real_symlink = os.symlink

    def full(target, link, *a, **k):
        folder = os.readlink(f"/proc/self/fd/{k['dir_fd']}") if k.get("dir_fd") is not None else ""
        if "images" in os.path.join(folder, str(link)):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(link))
        return real_symlink(target, link, *a, **k)

    monkeypatch.setattr(os, "symlink", full)
    monkeypatch.setattr("ovdet.cli.annotate.build_detector", lambda args: FakeDetector())
    code = main(["annotate", str(src), "--classes", ",".join(CLASSES), "--out", str(out), "--format", "yolo", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"ovdet: error: Cannot write to {out}: the disk quota is exceeded (EDQUOT")
    assert "No image was finished before this" in err and "resumes where this run stopped" in err


def test_classification():
    folder = Path("/data/out")
    assert output_write_error(OSError(errno.ENOSPC, "x"), folder).errno == errno.ENOSPC
    assert "read-only" in str(output_write_error(OSError(errno.EROFS, "x", "/data/out/a"), folder))
    assert output_write_error(OSError(errno.EROFS, "x", "/home/me/.ray"), folder) is None  # not the output folder's
    assert output_write_error(OSError(errno.ENOSPC, "x", "/tmp/elsewhere"), folder) is None
    # a permission problem counts only for a path in the output folder (reading an input is another matter)
    assert output_write_error(PermissionError(errno.EACCES, "x", "/data/out/a.txt"), folder) is not None
    assert output_write_error(PermissionError(errno.EACCES, "x", "/models/w.pt"), folder) is None
    assert output_write_error(OSError(errno.EINVAL, "x"), folder) is None


def test_vanished_output_folder(world, tmp_path):
    src, rels, _ = world

    class Vanishing(FakeDetector):
        def detect_batch(self, images, **kw):
            if self.calls == 1:  # moved away in one step: the write-behind thread may be writing into it right now
                os.rename(tmp_path / "out", tmp_path / "moved")
            return super().detect_batch(images, **kw)

    with pytest.raises(OutputWriteError, match="disappeared while ovdet was writing"):
        annotate_folder(src, CLASSES, tmp_path / "out", detector=Vanishing(), batch=2, quiet=True)
    assert run(src, tmp_path / "out").images_done == len(rels)  # starts afresh
    assert_exactly_once(tmp_path / "out", rels)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (the test runs as root on Linux), else skip."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_then_read_only_filesystem(world, small_disk):
    src, rels, clean = world
    out = small_disk / "out"
    filler = small_disk / "filler"
    before = shutil.disk_usage(small_disk).used
    run(src, out)
    needed = shutil.disk_usage(small_disk).used - before  # what a whole run takes on this filesystem
    for share in (0.1, 0.5, 0.9):  # fill the disk so that it runs out early, midway and late
        shutil.rmtree(out)
        filler.write_bytes(b"\0" * max(0, shutil.disk_usage(small_disk).free - int(needed * share)))
        with pytest.raises(OutputWriteError, match="the disk is full.*ENOSPC") as info:
            run(src, out)
        done = assert_journal_whole(out)
        assert (f"The {done} image" if done else "No image was finished") in str(info.value)
        filler.unlink()
        assert run(src, out).images_already_done == done
        assert_exactly_once(out, rels)
        assert snapshot(out) == clean
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OutputWriteError, match="read-only.*EROFS"):
        run(src, out, overwrite=True)
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
