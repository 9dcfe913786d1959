"""lock_output: one writer per folder across processes and threads, holder named, released by the OS on kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ovdet.runs import lock as runlock
from ovdet.errors import DatasetError, OutputLockedError, UnreliableLockWarning
from ovdet.runs.lock import LOCK_NAME, lock_output, read_holder
from ovdet.util.safeio import atomic_write, ensure_dir

REPO = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent("""
    import sys, time
    from ovdet.runs.lock import lock_output
    with lock_output(sys.argv[1], command="holder-test --out X"):
        print("locked", flush=True)
        time.sleep(600)
""")


def start_holder(folder: Path) -> subprocess.Popen:
    """A child process that holds `folder` until killed; returns once it holds it."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_with_the_holder_named_and_kill_9_frees_it(tmp_path):
    out = tmp_path / "out"
    proc = start_holder(out)
    try:
        holder = read_holder(out)
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
        assert holder["command"] == "holder-test --out X" and abs(holder["started"] - time.time()) < 600
        with pytest.raises(OutputLockedError) as info:
            with lock_output(out):
                pytest.fail("entered a folder another process holds")
        msg = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "holder-test --out X" in msg
        assert "wait for that run to finish" in msg and "another output folder" in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # the killed holder could not clean up ...
    with lock_output(out) as lock:  # ... and its lock file does not block anyone
        assert lock.holder["pid"] == os.getpid() and read_holder(out)["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_threads_exclude_each_other_same_thread_reenters_other_folders_are_free(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with lock_output(a):
                pass
        except BaseException as exc:  # handed to the main thread's assertion
            errors.append(exc)

    with lock_output(a) as outer:
        with lock_output(a) as inner:  # a job locking and calling a helper that locks the same folder
            assert inner is outer
        assert (a / LOCK_NAME).exists()  # still held after the inner block
        with lock_output(b):
            pass
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], OutputLockedError)
    assert f"pid {os.getpid()}" in str(errors[0])
    with lock_output(a):  # free again once released
        pass


def test_release_removes_what_the_lock_created(tmp_path):
    fresh = tmp_path / "new" / "out"
    with lock_output(fresh):
        assert fresh.is_dir()
    assert not fresh.exists()  # created for nothing: tidied away
    kept = tmp_path / "kept"
    with lock_output(kept):
        (kept / "result.txt").write_text("x")
    assert sorted(p.name for p in kept.iterdir()) == ["result.txt"]


def test_filesystem_type_reads_the_mount_table(tmp_path):
    fs = runlock.filesystem_type(tmp_path)
    assert fs and " " not in fs
    assert runlock.filesystem_type("/proc") == "proc"


def test_a_filesystem_where_flock_does_not_exclude_is_detected(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(runlock, "_try_flock", lambda fd: True)  # what a no-op flock looks like
    with pytest.warns(UnreliableLockWarning, match="do not exclude a second writer"):
        with lock_output(out) as lock:
            assert not lock.reliable
    # There the recorded holder is the fallback: a live process on this host still blocks ...
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out.mkdir(exist_ok=True)
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                 "started": time.time(), "command": "ovdet annotate A"}))
        with pytest.raises(OutputLockedError, match=f"pid {sleeper.pid}.*ovdet annotate A"):
            with lock_output(out):
                pass
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    # ... and a dead one does not.
    with pytest.warns(UnreliableLockWarning):
        with lock_output(out):
            pass


@pytest.mark.parametrize("fs", ["nfs4", "cifs", "fuse.sshfs"])
def test_a_network_filesystem_is_reported(tmp_path, monkeypatch, fs):
    monkeypatch.setattr(runlock, "filesystem_type", lambda path: fs)
    with pytest.warns(UnreliableLockWarning, match=f"{fs} filesystem.*may not be seen by other machines"):
        with lock_output(tmp_path / "out") as lock:
            assert not lock.reliable and lock.fs_type == fs


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo", "folder"])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused_untouched(tmp_path, plant):
    out, victim = tmp_path / "out", tmp_path / "authorized_keys"
    out.mkdir()
    victim.write_text("ssh-ed25519 AAAA me\n")
    {"symlink": lambda p: p.symlink_to(victim), "hardlink": lambda p: os.link(victim, p), "fifo": os.mkfifo,
     "folder": os.mkdir}[plant](out / LOCK_NAME)
    assert read_holder(out) is None  # not read through either
    with pytest.raises(DatasetError, match=f"refusing to use .*{LOCK_NAME}.*not a plain file of its own"):
        with lock_output(out):
            pytest.fail("locked through a planted name")
    assert victim.read_text() == "ssh-ed25519 AAAA me\n" and os.path.lexists(out / LOCK_NAME)
    assert not runlock._held  # nothing left half-held


def test_while_held_every_write_below_the_folder_checks_the_whole_chain(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (elsewhere / "b").mkdir(parents=True)
    out.mkdir()
    (out / "a").symlink_to(elsewhere, target_is_directory=True)
    with lock_output(out):
        with pytest.raises(DatasetError, match="symbolic link"):
            atomic_write(out / "a" / "b" / "f.txt", "x")  # no root given: the held folder is the root
    assert list((elsewhere / "b").iterdir()) == []
    atomic_write(out / "a" / "b" / "f.txt", "x")  # not held: only the file's own folder name is checked
    assert (elsewhere / "b" / "f.txt").read_text() == "x"


def _open_below(folder: Path) -> list[str]:
    """What this process has open under `folder` (from /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used, closed by now
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_folders_kept_open_while_held_are_reopened_if_deleted_and_closed_on_release(tmp_path):
    out = tmp_path / "out"
    with lock_output(out):
        ensure_dir(out / "sub")
        atomic_write(out / "sub" / "a.txt", "1")
        assert _open_below(out)  # checked once, kept for the next write
        shutil.rmtree(out / "sub")
        ensure_dir(out / "sub")
        atomic_write(out / "sub" / "b.txt", "2")  # into the new folder, not the deleted one
        assert sorted(os.listdir(out / "sub")) == ["b.txt"]
    assert _open_below(out) == []  # nothing outlives the lock (a read-only remount needs that)
