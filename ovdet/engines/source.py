"""Where a job's images are: a local (or shared-mount) folder, or an object-store URI read through pyarrow.

A URI (s3://, gs://, abfs://, hdfs://, ...) is opened with `pyarrow.fs.FileSystem.from_uri`, so everything
pyarrow understands works, query options included (`s3://bucket/x?endpoint_override=host:port&scheme=http`)
and credentials come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...). A file:// URI
is a local folder. Files are picked as in a folder walk (ovdet.media.sources.IMAGE_EXTENSIONS, hidden names skipped)
and listed in the same order, so every engine sees the same images in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ovdet.errors import DatasetError
from ovdet.media.sources import IMAGE_EXTENSIONS, iter_image_files

__all__ = ["Source", "is_uri", "open_source"]


def is_uri(text: str | os.PathLike) -> bool:
    """True for "scheme://..." (a one-letter scheme is a Windows drive, not a URI)."""
    scheme = urlsplit(str(text)).scheme
    return len(scheme) > 1 and "://" in str(text)


@dataclass(frozen=True)
class Source:
    """The images to annotate: a local folder (`folder`) or a pyarrow filesystem location (`spec`)."""

    uri: str  # what run.json records: the folder's absolute path, or the URI without its query (no secrets)
    spec: str  # what the workers open: the folder, or the URI as given (query options included)
    folder: Path | None  # set for a local folder
    recursive: bool = True

    @property
    def local(self) -> bool:
        return self.folder is not None

    def filesystem(self) -> tuple[Any, str]:
        """(pyarrow FileSystem, base path inside it) of a URI source."""
        import pyarrow.fs

        try:
            fs, base = pyarrow.fs.FileSystem.from_uri(self.spec)
        except (ValueError, OSError, TypeError) as exc:
            raise DatasetError(f"{self.uri}: cannot open this URI ({exc}); check the scheme, bucket and credentials "
                               "(pyarrow reads s3://, gs://, abfs://, hdfs:// and file://)") from exc
        return fs, base.rstrip("/")

    def list_images(self) -> Iterator[str]:
        """Paths of the image files relative to the source (POSIX separators), in folder-walk order."""
        if self.folder is not None:
            for f in iter_image_files(self.folder, recursive=self.recursive):
                yield f.relative_to(self.folder).as_posix()
            return
        import pyarrow.fs

        fs, base = self.filesystem()
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=self.recursive))
        except FileNotFoundError as exc:
            raise DatasetError(f"{self.uri}: no such bucket or prefix; check the URI") from exc
        except OSError as exc:
            raise DatasetError(f"{self.uri}: cannot be listed ({exc}); check the URI and the credentials") from exc
        rels = []
        for info in infos:
            if info.type != pyarrow.fs.FileType.File:
                continue
            rel = info.path[len(base) + 1:] if base else info.path
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                rels.append(rel)
        yield from sorted(rels, key=lambda r: r.split("/"))

    def location(self, rel: str) -> str:
        """Where image `rel` is: its absolute path, or its URI (without query options)."""
        if self.folder is not None:
            return os.path.abspath(self.folder / rel)
        return f"{self.uri.rstrip('/')}/{rel}"


def open_source(src: str | os.PathLike, recursive: bool = True) -> Source:
    """A Source for a folder path, a file:// URI (a folder) or another URI pyarrow can open."""
    text = os.fspath(src)
    parts = urlsplit(text)
    if not is_uri(text) or parts.scheme.lower() == "file":
        # absolute without resolving links, as the local engine records paths; workers have another cwd
        folder = Path(os.path.abspath(unquote(parts.path) if is_uri(text) else text))
        return Source(str(folder.resolve()), str(folder), folder, recursive)
    host = parts.netloc.rsplit("@", 1)[-1]  # never record user:password@
    shown = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return Source(shown, text, None, recursive)
