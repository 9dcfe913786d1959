"""ovdet's version: the one string, and the installed distribution's when there is one."""

from __future__ import annotations

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else this source tree's __version__."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ovdet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return __version__
