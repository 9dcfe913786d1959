"""One writer per output folder: an exclusive `fcntl.flock` on OUT/.ovdet-lock that the OS drops with the process.

`with lock_output(out): ...` holds the folder for the block. A second run into the same folder fails
at once with OutputLockedError naming the holder (pid, host, start time, command, read from the lock
file). A run that is killed (kill -9, power loss) holds nothing: the kernel releases the lock with the
process, so a stale lock file never blocks the next run. On filesystems where flock does not exclude
(some NFS/CIFS mounts, FUSE) the lock says so in an UnreliableLockWarning and falls back to refusing a
holder recorded in the file that is still alive on this host. The lock file is opened without following a link and
must be a regular file with one name (else DatasetError): a folder received from elsewhere cannot make the lock
write into another file.

Re-entrant within one thread (a job that locks and calls a helper that locks the same folder), exclusive
between threads, processes and hosts. Locks are inherited by forked children that do not exec; a
folder stays held until they exit too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovdet.errors import DatasetError, OutputLockedError, UnreliableLockWarning
from ovdet.util.safeio import describe_entry, hold_root, release_root

__all__ = ["LOCK_NAME", "RunLock", "filesystem_type", "lock_output", "read_holder"]

LOCK_NAME = ".ovdet-lock"
# O_NOFOLLOW: a link planted under the lock file's name is refused, not written through; O_NONBLOCK: a FIFO there
# does not hang the open; O_CLOEXEC: a program ovdet starts does not inherit the lock.
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# Filesystem types whose locks are handled by a server or a user-space daemon that may not honour them.
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
               "afs", "ncpfs", "virtiofs", "davfs", "fuse"}

_held: dict[tuple[int, int], "RunLock"] = {}  # (st_dev, st_ino) of a held folder -> its lock
_held_guard = threading.Lock()


@dataclass
class RunLock:
    """A held output folder: where, the lock file's descriptor, and whether the OS lock is trustworthy there."""

    folder: Path
    path: Path
    fd: int
    holder: dict[str, Any]
    reliable: bool  # False: flock did not exclude a second open of the file, or a network filesystem
    fs_type: str
    created_folder: bool
    thread: int
    depth: int = 1


def filesystem_type(path: str | os.PathLike) -> str:
    """The type (ext4, tmpfs, nfs4, ...) of the filesystem holding `path`, from /proc/self/mounts; "" if unknown."""
    target = os.path.realpath(path)
    best, fs = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fs = mount, parts[2]
    except OSError:
        return ""
    return fs


def read_holder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What the lock file of `folder` says about the run holding it (pid, host, started, command), or None
    (also for a lock file that is a link, FIFO or device: it is not read through)."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | _NO_FOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as fh:
            holder = json.loads(fh.read(65536))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another ovdet run (it has not recorded who it is yet)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"another ovdet run: pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}, "
            f"command: {holder.get('command', '?')}")


def _locked_error(folder: Path, holder: dict[str, Any] | None) -> OutputLockedError:
    return OutputLockedError(
        f"{folder} is in use by {_describe(holder)}. Only one run may write into an output folder at a time: "
        "wait for that run to finish (or stop it) and run your command again to continue, or choose another "
        "output folder.")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _excludes_second_open(folder: Path, fd: int) -> bool:
    """True if flock on a second open file description of the lock file is refused while `fd` holds it (local
    filesystems). The second open is checked to be the same file, so a name swapped meanwhile is never written."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        other = os.open(LOCK_NAME, os.O_RDONLY | _NO_FOLLOW, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        if not os.path.samestat(os.fstat(other), os.fstat(fd)):
            raise _not_plain(folder / LOCK_NAME, folder)
        if _try_flock(other):
            fcntl.flock(other, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(other)


def _alive_here(holder: dict[str, Any] | None) -> bool:
    """Whether a recorded holder is a live process on this host (only consulted where flock cannot be trusted)."""
    if not holder or holder.get("host") != socket.gethostname() or holder.get("pid") == os.getpid():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return isinstance(holder.get("pid"), int)
    return True


def _not_plain(path: Path, folder: Path) -> DatasetError:
    return DatasetError(
        f"refusing to use {path} as the lock file of {folder}: it is not a plain file of its own but "
        f"{describe_entry(path)}, so locking it would write into another file. ovdet never follows a link in an output "
        f"folder; remove {path} (ovdet did not make it: it makes a fresh one) and run again.")


def _open_locked(folder: Path) -> int | None:
    """Open and flock the lock file; None if someone else holds it. Retries if the file was swapped meanwhile.

    The file is opened without following a link and must be a regular file with one name, checked before the
    lock is taken and nothing is written before then.
    """
    path = folder / LOCK_NAME
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            try:
                fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o644, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                    raise _not_plain(path, folder) from None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise _not_plain(path, folder)
                if not _try_flock(fd):
                    os.close(fd)
                    return None
                # The previous holder unlinks the file on release; if we locked that unlinked inode, start over.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False))
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
                os.close(fd)
            except BaseException:
                os.close(fd)
                raise
    finally:
        os.close(dir_fd)


def _record_holder(fd: int, command: str | None) -> dict[str, Any]:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "command": command if command is not None else shlex.join(getattr(sys, "orig_argv", sys.argv))}
    data = (json.dumps(holder, ensure_ascii=False) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.ENOSPC, "short write of the lock file", str(fd))
    return holder


@contextmanager
def lock_output(folder: str | os.PathLike, command: str | None = None) -> Iterator[RunLock]:
    """Hold `folder` (created if missing) for exclusive writing during the block.

    Raises OutputLockedError at once if another run holds it. `command` is recorded for that message
    (default: this process's argv). On release the lock file is removed, and the folder too if this
    call created it and it is still empty.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    st = os.stat(folder)
    key = (st.st_dev, st.st_ino)
    me = threading.get_ident()
    with _held_guard:
        mine = _held.get(key)
        if mine is not None and mine.thread == me:
            mine.depth += 1
        elif mine is not None:
            raise _locked_error(folder, mine.holder)
    if mine is not None:
        try:
            yield mine
        finally:
            with _held_guard:
                mine.depth -= 1
        return

    fd = _open_locked(folder)
    if fd is None:
        raise _locked_error(folder, read_holder(folder))
    lock_path = folder / LOCK_NAME
    try:
        fs = filesystem_type(folder)
        excludes = _excludes_second_open(folder, fd)
        network = fs.split(".")[0] in _NETWORK_FS  # fuse.sshfs -> fuse
        reliable = excludes and not network
        if not reliable:
            previous = read_holder(folder)
            if _alive_here(previous):
                raise _locked_error(folder, previous)
            how = "may not be seen by other machines" if network else "do not exclude a second writer"
            warnings.warn(
                f"{folder} is on a {fs or 'unknown'} filesystem where file locks {how}; ovdet cannot guarantee "
                "that no other run writes into it at the same time. Make sure only one run uses this output "
                "folder, or write to a local disk and copy the result over.", UnreliableLockWarning, stacklevel=3)
        holder = _record_holder(fd, command)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(folder, lock_path, fd, holder, reliable, fs, created, me)
    with _held_guard:
        _held[key] = lock
    hold_root(folder)  # writes below the folder check every folder between it and the file (ovdet.util.safeio)
    try:
        yield lock
    finally:
        release_root(folder)
        with _held_guard:
            _held.pop(key, None)
        _release(lock)


def _release(lock: RunLock) -> None:
    """Remove the lock file while still holding it, then drop the lock; remove a folder we created if empty."""
    try:
        os.unlink(lock.path)
    except OSError:
        pass  # gone with its folder, or a read-only folder: a lock file left behind never blocks a later run
    finally:
        os.close(lock.fd)  # closing the last descriptor releases the flock
    if lock.created_folder:
        try:
            lock.folder.rmdir()
        except OSError:
            pass  # not empty (the usual case) or already gone: nothing to tidy
