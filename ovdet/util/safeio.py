"""Link-free file writing: folders opened component by component below a root, files replaced atomically in them.

A run folder may come from someone else, so every name in it may be a planted symbolic link, hard link or FIFO.
Nothing here follows one: a folder is opened from its root one component at a time with O_NOFOLLOW|O_DIRECTORY
(a link anywhere below the root is refused, and the descriptor keeps pointing at the checked folder), a file is
written to a temporary name that is random and created with O_EXCL|O_NOFOLLOW inside that folder, then renamed
over its final name (a rename replaces a link instead of writing through it). The root itself is the folder the
user named; links above and in it are theirs. Helpers layer: imports nothing of ovdet but its errors.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ovdet.errors import DatasetError

__all__ = ["TMP_SUFFIX", "Folder", "atomic_link", "atomic_open", "atomic_write", "ensure_dir", "hold_root",
           "not_plain_file", "open_no_follow", "read_no_follow", "release_root", "remove_stale_temp_files"]

TMP_SUFFIX = ".ovdet-tmp"
# A link that fails for these reasons fails as a copy too: report them instead of trying the next way.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a file's name returns at once (and is refused) instead of hanging.
_READ = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)


def describe_entry(path: Path) -> str:
    """What is at `path` instead of a plain file or folder, in words."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISREG(st.st_mode):
        return f"a hard link: the same file has {st.st_nlink} names" if st.st_nlink > 1 else "a plain file"
    return "a FIFO, socket or device file"


def not_plain_file(path: str | os.PathLike, what: str = "an output file") -> DatasetError:
    """The error for a name ovdet would write (or read as its own) that is not a plain file of its own."""
    path = Path(path)
    return DatasetError(f"refusing to use {path} as {what}: it is not a plain file of its own but "
                        f"{describe_entry(path)}, so using it could read or change a file outside the folder. "
                        f"ovdet never follows a link in a run or output folder: remove {path} (ovdet did not make "
                        "it), or use another folder.")


def _not_plain_folder(path: Path, root: Path) -> DatasetError:
    return DatasetError(f"{path} is {describe_entry(path)}, not a folder: ovdet writes only inside {root} and never "
                        "follows a symbolic link below it. Remove the link (it was not made by ovdet), or choose "
                        "another output folder.")


def _open_chain(folder: str, root: str, create: bool) -> int:
    """A descriptor of `folder`, reached from `root` one component at a time without following a link (both absolute
    and normalised; plain string work: this runs for every file a run writes)."""
    if folder == root:
        parts: list[str] = []
    elif folder.startswith(root.rstrip(os.sep) + os.sep):
        parts = folder[len(root.rstrip(os.sep)) + 1:].split(os.sep)
    else:
        raise ValueError(f"{folder} is not inside {root}")  # a bug in the caller
    if create:
        os.makedirs(root, exist_ok=True)
    fd = os.open(root, _DIR)
    try:
        for i, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass  # a folder is what we want; anything else is refused by the open below
            try:
                nxt = os.open(part, _DIR | _NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise _not_plain_folder(Path(root, *parts[:i + 1]), Path(root)) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


# Output folders this process holds (ovdet.runs.lock registers each while its lock is held), each with the folders
# below it opened so far. A write below one with no explicit root checks every folder between that output folder and
# the file, not only the last one; and a folder's descriptor, checked once, serves every later write into it until
# the lock is released (a folder deleted meanwhile is opened again), which saves four system calls per file.
_held_roots: dict[str, dict[str, int]] = {}
_held_guard = threading.Lock()


def hold_root(folder: str | os.PathLike) -> None:
    """Make `folder` the default root of writes below it until `release_root(folder)`."""
    with _held_guard:
        _held_roots.setdefault(os.path.abspath(folder), {})


def release_root(folder: str | os.PathLike) -> None:
    """Forget `folder` and close the descriptors of the folders opened below it."""
    with _held_guard:
        opened = _held_roots.pop(os.path.abspath(folder), {})
    for fd in opened.values():
        os.close(fd)


def _default_root(folder: str) -> str:
    """The innermost held output folder containing `folder`, else `folder`'s parent."""
    held = [r for r in list(_held_roots) if folder == r or folder.startswith(r.rstrip(os.sep) + os.sep)]
    return max(held, key=len) if held else os.path.dirname(folder)


def _held_fd(folder: str, root: str, create: bool) -> int | None:
    """The kept descriptor of `folder` below the held output folder `root` (opened now if need be); None if `root`
    is not held."""
    with _held_guard:
        opened = _held_roots.get(root)
        fd = None if opened is None else opened.get(folder)
    if opened is None:
        return None
    if fd is not None and os.fstat(fd).st_nlink > 0:
        return fd
    new = _open_chain(folder, root, create)
    with _held_guard:
        if root not in _held_roots:  # released meanwhile (another thread): do not keep it
            os.close(new)
            return None
        old = _held_roots[root].get(folder)
        _held_roots[root][folder] = new
    if old is not None:
        os.close(old)
    return new


def _tmp_name(name: str) -> str:
    """An unpredictable temporary name beside `name` (remove_stale_temp_files knows its shape)."""
    return f".{name[:200]}.{secrets.token_hex(8)}{TMP_SUFFIX}"


def _discard(name: str, dir_fd: int) -> None:
    """Remove the temporary file of a write that failed."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass  # never created, or its folder turned read-only: remove_stale_temp_files clears what a later run finds


class Folder:
    """A folder opened link-free below `root`, created if missing; files go in by name.

    `root` defaults to the innermost output folder this process holds (see hold_root) that contains it, else to its
    parent (then only the folder's own name is checked).
    """

    def __init__(self, folder: str | os.PathLike, root: str | os.PathLike | None = None, create: bool = True):
        self.fd, self._owned = -1, False
        self._path = os.path.abspath(folder)
        self._root = _default_root(self._path) if root is None else os.path.abspath(root)
        kept = _held_fd(self._path, self._root, create) if self._root in _held_roots else None
        self._owned = kept is None  # a kept descriptor belongs to the held root and is closed with it
        self.fd = _open_chain(self._path, self._root, create) if kept is None else kept

    @property
    def path(self) -> Path:
        return Path(self._path)

    def close(self) -> None:
        if self.fd >= 0 and self._owned:
            os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _create(self, name: str) -> tuple[int, str]:
        """A new temporary file (O_EXCL: never an existing name or link) and its name."""
        while True:
            tmp = _tmp_name(name)
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666,
                               dir_fd=self.fd), tmp
            except FileExistsError:
                continue  # 64 random bits taken: draw again

    def _replace(self, tmp: str, name: str) -> None:
        try:
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            if isinstance(exc, FileExistsError) and exc.errno != errno.ENOTEMPTY:
                raise
            raise DatasetError(f"{self.path / name} is a folder where ovdet writes a file; remove it (ovdet did not "
                               "make it), or choose another output folder.") from None

    @contextmanager
    def atomic_open(self, name: str, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
        """A temporary file that becomes `name` when the block ends without error and is removed otherwise."""
        fd, tmp = self._create(name)
        try:
            try:
                fh = open(fd, mode, **kwargs)
            except BaseException:
                os.close(fd)
                raise
            with fh:
                yield fh
            self._replace(tmp, name)
        except BaseException:
            _discard(tmp, self.fd)
            raise

    def write(self, name: str, data: bytes | str) -> None:
        """`name` holds `data`: readers only ever see the old or the complete new file."""
        with self.atomic_open(name, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)

    def link(self, target: str | os.PathLike, name: str) -> None:
        """`name` points at the regular file `target`: a symlink, else a hard link, else a copy; atomically."""
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise DatasetError(f"{target} is gone (moved or deleted after it was read), so {self.path / name} cannot "
                               "point at it; put it back, or run again to leave it out") from None
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{target} is not a regular file; ovdet links only image files into "
                               f"{self.path}")
        tmp = self._make_link(target, name)
        try:
            self._replace(tmp, name)
        except BaseException:
            _discard(tmp, self.fd)
            raise

    def _make_link(self, target: str | os.PathLike, name: str) -> str:
        tmp = _tmp_name(name)
        try:
            os.symlink(os.path.abspath(target), tmp, dir_fd=self.fd)
            return tmp
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
        try:
            os.link(target, tmp, dst_dir_fd=self.fd)
            return tmp
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
        fd, tmp = self._create(name)
        try:
            with open(fd, "wb") as dst, open(target, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
        except BaseException:
            _discard(tmp, self.fd)
            raise
        return tmp

    def remove_stale_temp_files(self) -> int:
        """Delete the temporary files a killed run left here (links among them are removed, not followed)."""
        removed = 0
        for entry in os.scandir(self.fd):
            if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and not entry.is_dir(
                    follow_symlinks=False):
                os.unlink(entry.name, dir_fd=self.fd)
                removed += 1
        return removed


def ensure_dir(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Create `folder` and the folders between it and `root` (default: see Folder); DatasetError if one is a link."""
    Folder(folder, root).close()
    return Path(folder)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, root: str | os.PathLike | None = None,
                **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file that becomes `path` when the block ends without error and is removed otherwise.

    Readers only ever see the old or the complete new file, and a write that fails (a full disk) leaves no partial
    file behind. No link is followed between `root` (default: see Folder) and the file.
    """
    parent, name = os.path.split(os.path.abspath(path))
    with Folder(parent, root, create=False) as folder, folder.atomic_open(name, mode, **kwargs) as fh:
        yield fh


def atomic_write(path: str | os.PathLike, data: bytes | str, *, root: str | os.PathLike | None = None) -> None:
    """Write `data` to `path` so that readers only ever see the old or the complete new file."""
    parent, name = os.path.split(os.path.abspath(path))
    with Folder(parent, root, create=False) as folder:
        folder.write(name, data)


def atomic_link(target: str | os.PathLike, link: str | os.PathLike, *, root: str | os.PathLike | None = None) -> None:
    """Make `link` point at the regular file `target`: a symlink, else a hard link, else a copy; atomically."""
    parent, name = os.path.split(os.path.abspath(link))
    with Folder(parent, root, create=False) as folder:
        folder.link(target, name)


def remove_stale_temp_files(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> int:
    """Delete temporary files a killed run left in `folder` (not recursive); returns how many."""
    try:
        opened = Folder(folder, root, create=False)
    except FileNotFoundError:
        return 0
    with opened:
        return opened.remove_stale_temp_files()


def open_no_follow(path: str | os.PathLike, what: str = "a run file") -> IO[bytes]:
    """`path` opened for reading if it is a regular file of its own (no link, FIFO or device); DatasetError if not.

    FileNotFoundError if there is nothing at `path`.
    """
    try:
        fd = os.open(path, _READ)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise not_plain_file(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_plain_file(path, what)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb")


def read_no_follow(path: str | os.PathLike, what: str = "a run file") -> bytes:
    """The bytes of the regular file `path` (see open_no_follow)."""
    with open_no_follow(path, what) as fh:
        return fh.read()
