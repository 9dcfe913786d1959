"""Open a torch.save zip archive with PyTorch's own zip reader, after proving every zip reader sees the same files.

A zip file can be read two ways: Python's `zipfile` finds the central directory `size` bytes before the end record,
PyTorch's reader (miniz) trusts the offset written in that record. A crafted file can show a harmless archive to one
and a TorchScript program to the other. So ovdet reads checkpoint bytes only through PyTorch's reader, and only after
checking that both readers agree on every entry (name, count, where its data starts, its size) and that the archive
cannot expand beyond a bound: one view of the file, which the checks and the load share.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from ovdet.errors import ModelError, WeightsCorruptError, WeightsUnsafeError

MAX_BYTES_ENV = "OVDET_MAX_CHECKPOINT_BYTES"  # bytes (or 512M, 8G) an archive may expand to; default 4 GiB
DEFAULT_MAX_BYTES = 4 << 30
# torch.save stores records uncompressed, so a real archive expands to about its own size; 20x leaves room for a
# re-zipped (deflated) checkpoint and refuses zip bombs (a few hundred KB claiming gigabytes) before any is read.
MAX_RATIO = 20
# Records that only TorchScript (torch.jit.save) writes: torch.load hands such an archive to torch.jit.load, which
# runs the program inside. torch.save writes data.pkl, data/N, version, byteorder and a few .format/.data files.
TORCHSCRIPT_MARKS = ("constants.pkl", "bytecode.pkl", "code/", "constants/", "extra/")

_EOCD, _EOCD64, _LOCATOR = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_LOCAL = b"PK\x03\x04"
_FIX = ("Download it again from where it was published, or import a good copy with `ovdet weights import PATH`.")


def max_archive_bytes() -> int:
    """The most bytes a checkpoint archive may expand to: $OVDET_MAX_CHECKPOINT_BYTES, else 4 GiB."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:I?B)?", raw.upper())
    if not match:
        raise ModelError(f"{MAX_BYTES_ENV}={raw!r} is not a size: give bytes, or a number with K, M, G or T "
                         "(e.g. 8G), or unset it for the default of 4G.")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2) or " "))


class TorchArchive:
    """A torch zip archive whose entries Python's zipfile and PyTorch's reader agree on; records read via PyTorch."""

    def __init__(self, source: str, reader: Any, sizes: dict[str, int]):
        self.source, self._reader, self.sizes = source, reader, sizes

    @property
    def records(self) -> list[str]:
        return list(self.sizes)

    def torchscript_marks(self) -> list[str]:
        """The records that make this a TorchScript archive rather than a torch.save checkpoint (empty if none)."""
        return [name for name in self.sizes if name.startswith(TORCHSCRIPT_MARKS)]

    def read(self, name: str) -> bytes:
        if name not in self.sizes:
            raise WeightsCorruptError(f"{self.source} has no record {name!r}, which a PyTorch checkpoint needs. {_FIX}")
        try:
            return self._reader.get_record(name)
        except RuntimeError as exc:  # miniz: CRC mismatch, bad local header, inflate error
            raise _damaged(self.source, f"record {name} cannot be read: {_first_line(exc)}") from exc

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The bytes of record data/KEY as a CPU storage; the pickle's claimed size must be the record's size."""
        name = f"data/{key}"
        if self.sizes.get(name) != nbytes:
            found = "is missing" if name not in self.sizes else f"holds {self.sizes[name]} bytes"
            raise _damaged(self.source, f"its pickle asks for {nbytes} bytes from {name}, which {found}")
        try:
            tensor = self._reader.get_storage_from_record(name, nbytes, torch.UntypedStorage)
            return tensor._typed_storage()._untyped_storage
        except RuntimeError as exc:
            raise _damaged(self.source, f"record {name} cannot be read: {_first_line(exc)}") from exc


class opened:
    """`with opened(path or binary file) as archive`: the archive checked and opened by open_archive; a path is
    opened here, read through one file handle, and closed on exit."""

    def __init__(self, source: str | Path | IO[bytes]):
        self.source, self.file = source, None

    def __enter__(self) -> TorchArchive:
        if hasattr(self.source, "read"):
            return open_archive(self.source, getattr(self.source, "name", "<file object>"))
        path = Path(self.source)
        try:
            self.file = open(path, "rb")
        except OSError as exc:
            raise WeightsCorruptError(f"{path} cannot be read ({exc.strerror or exc}). Check the path and its "
                                      "permissions.") from exc
        try:
            return open_archive(self.file, path)
        except BaseException:
            self.file.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()


def open_archive(file: IO[bytes], source: str | Path) -> TorchArchive:
    """Check the zip structure of `file` (an open binary file) and open it with PyTorch's reader.

    Raises WeightsCorruptError for anything that is not a well-formed zip within the size bounds, and
    WeightsUnsafeError when Python's zipfile and PyTorch's reader would see different entries. The reader reads
    from the same open file, so nothing can swap the file between the checks and the reads.
    """
    source = str(source)
    file.seek(0, io.SEEK_END)
    size = file.tell()
    entries, cd_size, cd_offset, end_start = _end_records(file, size, source)
    limit = max_archive_bytes()
    try:
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise _damaged(source, f"its zip directory cannot be read ({type(exc).__name__}: {exc})") from exc
    if cd_offset + cd_size != end_start or len(infos) != entries:
        raise _disagree(source, f"the end record puts {entries} entries at offset {cd_offset}, but Python's zipfile "
                                f"reads {len(infos)} entries at offset {end_start - cd_size}")
    names = _check_entries(file, infos, cd_offset, size, limit, source)
    try:
        file.seek(0)
        reader = torch._C.PyTorchFileReader(file)
        records = reader.get_all_records()
        if sorted(records) != sorted(names):
            raise _disagree(source, f"Python's zipfile lists {len(names)} entries ({_few(names)}), PyTorch's reader "
                                    f"{len(records)} ({_few(records)})")
        for name, (data_offset, length) in names.items():
            if reader.get_record_offset(name) != data_offset or reader.get_record_size(name) != length:
                raise _disagree(source, f"entry {name} starts at byte {reader.get_record_offset(name)} with "
                                        f"{reader.get_record_size(name)} bytes for PyTorch's reader, at byte "
                                        f"{data_offset} with {length} bytes for Python's zipfile")
    except (RuntimeError, UnicodeDecodeError) as exc:  # miniz refuses it (bad directory, no version record, ...)
        raise _damaged(source, f"PyTorch's zip reader refuses it ({_first_line(exc)})") from exc
    return TorchArchive(source, reader, {name: length for name, (_, length) in names.items()})


def _end_records(file: IO[bytes], size: int, source: str) -> tuple[int, int, int, int]:
    """(entries, central directory size, its offset, where the end records start) from the end of the file.

    The end-of-central-directory record must close the file with no comment (torch writes none), so every reader
    finds the same one; a zip64 end record must sit right before its locator, where zipfile looks for it, and agree
    with the locator, which miniz follows.
    """
    if size < 22:
        raise _damaged(source, f"it is {size} bytes, too short for a zip archive")
    file.seek(size - 22)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = struct.unpack("<4s4H2LH", file.read(22))
    if sig != _EOCD or comment or disk or cd_disk or n_disk != n_total:
        raise _damaged(source, "it does not end like a zip archive written by torch.save (an end record with no "
                               "comment); a pre-1.6 torch.save file, which is no zip, loads only with --trust-weights")
    end_start = size - 22
    if size >= 22 + 20 + 56:
        file.seek(size - 42)
        loc_sig, loc_disk, eocd64_at, disks = struct.unpack("<4sLQL", file.read(20))
        if loc_sig == _LOCATOR:
            end_start = size - 42 - 56
            file.seek(end_start)
            sig64, _, _, _, disk64, cd_disk64, n_disk64, n64, cd_size64, cd_offset64 = struct.unpack(
                "<4sQ2H2L4Q", file.read(56))
            if sig64 != _EOCD64 or eocd64_at != end_start or loc_disk or disks != 1 or disk64 or cd_disk64 \
                    or n_disk64 != n64:
                raise _disagree(source, "its zip64 end record is not where its locator points")
            for short, full, saturated in ((n_total, n64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF),
                                           (cd_offset, cd_offset64, 0xFFFFFFFF)):
                if short not in (full, saturated):
                    raise _disagree(source, "its zip and zip64 end records give different directories")
            n_total, cd_size, cd_offset = n64, cd_size64, cd_offset64
    return n_total, cd_size, cd_offset, end_start


def _check_entries(file: IO[bytes], infos: list[zipfile.ZipInfo], cd_offset: int, size: int, limit: int,
                   source: str) -> dict[str, tuple[int, int]]:
    """{record name without the archive folder: (data offset, size)} after checking each local header, that no two
    entries overlap, and that the archive expands to at most min(limit, MAX_RATIO x file size)."""
    if not infos:
        raise _damaged(source, "the zip archive is empty")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    total = sum(info.file_size for info in infos)
    bound = min(limit, MAX_RATIO * size)
    if total > bound:
        why = (f"more than {MAX_RATIO} times its {size} bytes on disk, which only a zip bomb does"
               if total > MAX_RATIO * size else
               f"more than the {limit}-byte limit; raise {MAX_BYTES_ENV} if you trust this file")
        raise WeightsCorruptError(f"{source} was refused: its entries expand to {total} bytes, {why}. Nothing from it "
                                  f"was unpacked. {_FIX}")
    names: dict[str, tuple[int, int]] = {}
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if not info.filename.startswith(prefix) or info.filename == prefix:
            raise _damaged(source, f"entry {info.filename!r} is outside the archive folder {prefix!r}")
        name = info.filename[len(prefix):]
        if name in names:
            raise _disagree(source, f"entry {name} appears twice")
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or (
                info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size):
            raise _damaged(source, f"entry {name} is encrypted or compressed in a way torch never writes")
        if info.header_offset < end:
            raise _disagree(source, f"entry {name} overlaps the entry before it")
        file.seek(info.header_offset)
        header = file.read(30)
        if len(header) < 30 or header[:4] != _LOCAL:
            raise _damaged(source, f"entry {name} has no local header at byte {info.header_offset}")
        name_len, extra_len = struct.unpack("<2H", header[26:30])
        if file.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise _disagree(source, f"entry {name} has another name in its local header")
        data_offset = info.header_offset + 30 + name_len + extra_len
        end = data_offset + info.compress_size
        if end > cd_offset:
            raise _damaged(source, f"entry {name} runs past the start of the zip directory")
        names[name] = (data_offset, info.file_size)
    return names


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _few(names: Any) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _damaged(source: str, why: str) -> WeightsCorruptError:
    return WeightsCorruptError(f"{source} is not a readable PyTorch checkpoint: {why}. The file is truncated, damaged "
                               f"or not a checkpoint. {_FIX}")


def _disagree(source: str, why: str) -> WeightsUnsafeError:
    return WeightsUnsafeError(
        f"{source} was refused: Python's zip reader and PyTorch's see different contents ({why}). A damaged download "
        "can do this, and so can a file crafted to show a harmless checkpoint to a checker and a program to "
        f"torch.load. Nothing from it was run. {_FIX}")
