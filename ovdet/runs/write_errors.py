"""Turn an OS failure to write an output folder (disk full, quota, read-only, folder gone) into an OutputWriteError.

A long job wraps its writing in `explain_write_errors(out, finished)`: an OSError that means the folder
cannot take more data becomes one clear message (what happened, what is safe, what to do, that running
the same command again resumes), which the CLI prints without a traceback. Other OSErrors pass unchanged.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ovdet.util.display import shown
from ovdet.errors import OutputWriteError

__all__ = ["explain_write_errors", "output_write_error"]

# errno -> (what happened, what to do about it); these only ever come from writing.
_FULL = {
    errno.ENOSPC: ("the disk is full (no space left on device)", "free some space on it"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or ask for a larger quota"),
    errno.EFBIG: ("a file grew past the largest size this filesystem allows", "write to another filesystem"),
    errno.EROFS: ("the filesystem is read-only", "remount it read-write or choose another output folder"),
}
# These also come from reading, so they count only for paths in the output folder.
_ACCESS = {
    errno.EACCES: ("permission to write is denied", "make the folder writable for this user"),
    errno.EPERM: ("the operation is not permitted", "make the folder writable for this user"),
    errno.EIO: ("the device reported an input/output error", "check the disk or network share"),
}
_GONE = (errno.ENOENT, errno.ESTALE, errno.ENOTDIR)


def _inside(path: str | bytes | None, folder: Path) -> bool:
    """True for a path in `folder`, and for a bare file name: ovdet's writers name their files relative to the
    open output folder (dir_fd), so an error names just the file, e.g. `.a.txt.5f3c.ovdet-tmp`."""
    if path is None:
        return False
    name = os.fsdecode(path)
    if not os.path.isabs(name) and os.sep not in name:
        return True
    p = os.path.abspath(name)
    root = os.path.abspath(folder)
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


def output_write_error(exc: OSError, folder: str | os.PathLike, finished: str = "") -> OutputWriteError | None:
    """The OutputWriteError that explains `exc` while writing into `folder`, or None if `exc` is something else.

    `finished` says what is already safe (e.g. "The 120 images finished before this are kept in
    OUT/predictions.jsonl."); it is left out when the folder itself is gone.
    """
    folder = Path(folder)
    ours = _inside(exc.filename, folder) or _inside(exc.filename2, folder)
    where = f" ({shown(exc.filename)})" if exc.filename else ""  # file and folder names may hold control bytes
    code = errno.errorcode.get(exc.errno, str(exc.errno))
    resume = "then run the same command again: it resumes where this run stopped and does the rest exactly once."
    if exc.errno in _GONE and (ours or exc.filename is None) and not folder.is_dir():
        return OutputWriteError(
            f"The output folder {shown(folder)} disappeared while ovdet was writing into it (deleted, moved or unmounted; "
            f"{code}{where}). Whatever it held is no longer there. Check the path or mount, then run the same "
            "command again: it resumes from what the folder holds, or starts afresh.", exc.errno)
    # a full or read-only filesystem counts unless the error names a path elsewhere (e.g. a library writing into a
    # read-only home: "the output folder is read-only" would send the user the wrong way)
    if (exc.errno in _FULL and (ours or exc.filename is None)) \
            or (exc.errno in _ACCESS and (ours or exc.filename is None and exc.errno == errno.EIO)):
        what, todo = (_FULL | _ACCESS)[exc.errno]
        return OutputWriteError(
            f"Cannot write to {shown(folder)}: {what} ({code}{where}). {finished + ' ' if finished else ''}"
            f"Nothing half-written is kept. {todo[0].upper()}{todo[1:]}, {resume}", exc.errno)
    return None


@contextmanager
def explain_write_errors(folder: str | os.PathLike, finished: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Raise OutputWriteError (from the original) for an OSError that means `folder` cannot be written."""
    try:
        yield
    except OSError as exc:
        error = output_write_error(exc, folder, finished())
        if error is None:
            raise
        raise error from exc
