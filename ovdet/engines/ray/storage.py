"""How a Ray worker reads the images of a Source: from the folder, or through pyarrow from an object store.

The driver lists the images (ovdet.engines.source); each worker opens the source's filesystem once and reads and
decodes its own images, so no image passes through the driver.
"""

from __future__ import annotations

from typing import Any

from ovdet.engines.source import Source
from ovdet.errors import ImageReadError
from ovdet.media.sources import decode_image, load_image

__all__ = ["SourceReader"]


class SourceReader:
    """Reads and decodes images of one Source inside a worker (the filesystem is opened once)."""

    def __init__(self, source: Source):
        self.source = source
        self._fs: Any = None
        self._base = ""
        if not source.local:
            self._fs, self._base = source.filesystem()

    def read(self, rel: str) -> tuple[Any, bytes | None]:
        """(BGR image, raw bytes for a URI source) of `rel`; ImageReadError when it cannot be read or decoded."""
        if self._fs is None:
            return load_image(self.source.folder / rel), None
        name = self.source.location(rel)
        try:
            with self._fs.open_input_stream(f"{self._base}/{rel}" if self._base else rel) as fh:
                data = fh.read()
        except FileNotFoundError:
            raise ImageReadError(f"{name}: file does not exist; check the path") from None
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot be read ({exc})") from exc
        return decode_image(data, name), data
