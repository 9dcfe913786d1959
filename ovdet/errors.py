"""Exception types a user can catch. Every message says what went wrong and what to do."""

from __future__ import annotations


class OVDetError(Exception):
    """Base class of every error ovdet raises on purpose."""


class ClassSpecError(OVDetError, ValueError):
    """The class list or class file is empty, blank, duplicated or malformed."""


class ImageError(OVDetError, ValueError):
    """An image path, file or array cannot be used as an image."""


class ImageReadError(ImageError):
    """A file is missing, unreadable, corrupt, truncated or not an image."""


class InvalidImageError(ImageError):
    """An in-memory image has the wrong type, shape or dtype."""


class ModelError(OVDetError):
    """A model name, file or configuration cannot be used."""


class UnknownModelError(ModelError, ValueError):
    """A model name that ovdet does not know and that is not an existing file."""


class WeightsNotFoundError(ModelError, FileNotFoundError):
    """A weights file is missing and cannot be downloaded (offline or download failed)."""


class WeightsCorruptError(ModelError):
    """A weights file exists but is truncated, corrupt or not the expected kind of model."""


class WeightsUnsafeError(ModelError):
    """A weights file would run code when loaded (it names globals outside ovdet's allowlist); it was not loaded.

    `names` lists the module.name globals it asked for. The way out, for files you trust: --trust-weights /
    trust_weights=True, which runs code from the file.
    """

    def __init__(self, message: str, names: list[str] | None = None):
        super().__init__(message)
        self.names = list(names or [])


class TileError(OVDetError, ValueError):
    """Tiling settings that cannot work (tile size, overlap, merge method); the message names valid values."""


class SourceError(OVDetError):
    """A video file, camera or stream cannot be opened or stopped delivering frames."""


class VideoOutputError(OVDetError):
    """An output video or JSONL file cannot be written."""


class DatasetError(OVDetError):
    """An input folder, dataset or output folder cannot be used as asked."""


class ResumeMismatchError(DatasetError):
    """An interrupted run is resumed with different classes or model; pass --overwrite to start over."""


class OutputLockedError(DatasetError):
    """Another run is writing into the same output folder; wait for it or choose another folder."""


class OutputWriteError(DatasetError):
    """The output folder cannot be written (disk full, quota, read-only, removed); the finished part is kept."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class EngineError(OVDetError):
    """A job engine cannot run as asked: Ray not installed, no cluster at the address, outputs not shared."""


class OVDetWarning(UserWarning):
    """Base class of the warnings ovdet gives (the CLI prints them as one plain line)."""


class UnreliableLockWarning(OVDetWarning):
    """The output folder's filesystem does not honour file locks, so a second writer cannot be ruled out."""


class RelabelError(OVDetError, ValueError):
    """relabel options name an unknown class or ask for a threshold below the one the run kept boxes at."""
