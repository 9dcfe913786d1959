"""Hostile .pt files: a zip that shows torch.load a TorchScript program, zip bombs, and mutations of the demo model."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Tuple

import pytest
import torch

from ovdet import OVDetector
from ovdet.weights.checkpoint import load_checkpoint, world_model_of
from ovdet.cli import main
from ovdet.errors import ModelError, OVDetError, WeightsCorruptError, WeightsUnsafeError
from ovdet.weights.registry import DEMO_FILE

PRECIOUS = b"precious"  # what the victim file holds; the payload overwrites it with AAAAAAAA


class Overwriter(torch.nn.Module):
    """A TorchScript module whose __setstate__, run by torch.jit.load, maps `path` shared and overwrites it."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.w = torch.zeros(1)
        self.buf = torch.zeros(8, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor]:
        return (self.path, self.w)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor]) -> None:
        self.path = state[0]
        self.w = state[1]
        self.training = False
        buf = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8)
        buf.fill_(65)
        self.buf = buf  # kept, or TorchScript drops the write as dead code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w


def _entries(archive: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _local_entries(entries: list[tuple], start: int) -> tuple[bytes, list[tuple]]:
    """Local headers and data of `entries`: (name, bytes) stored, or (name, deflated bytes, crc, size)."""
    out, rows = b"", []
    for name, payload, *deflated in entries:
        raw = name.encode()
        method, crc, size = (8, *deflated) if deflated else (0, zlib.crc32(payload), len(payload))
        rows.append((raw, method, crc, len(payload), size, start + len(out)))
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size, len(raw), 0)
        out += raw + payload
    return out, rows


def _directory(rows: list[tuple], shift: int, size: int | None = None) -> bytes:
    """A central directory (of exactly `size` bytes: the last entry's comment pads it); offsets minus `shift`."""
    out = [struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, packed, n, len(raw), 0, 0, 0,
                       0, 0, offset - shift) + raw for raw, method, crc, packed, n, offset in rows]
    pad = 0 if size is None else size - sum(map(len, out))
    last = bytearray(out[-1])
    struct.pack_into("<H", last, 32, pad)
    out[-1] = bytes(last) + b" " * pad
    return b"".join(out)


def _zip(entries: list[tuple]) -> bytes:
    data, rows = _local_entries(entries, 0)
    directory = _directory(rows, 0)
    return data + directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(rows), len(rows), len(directory),
                                          len(data), 0)


def polyglot(benign: bytes, hidden: bytes) -> bytes:
    """One file, two archives: Python's zipfile finds the directory `size` bytes before the end record and sees
    `benign`; PyTorch's reader (miniz) follows the offset in the end record and sees `hidden`.

    Layout: hidden's entries, benign's entries, hidden's directory, benign's directory (both padded to one size),
    end record (hidden's count, that size, hidden's directory offset). zipfile adds the difference between where
    it found the directory and the stored offset to every entry offset, so benign's offsets are stored less that.
    """
    hidden_data, hidden_rows = _local_entries(_entries(hidden), 0)
    benign_data, benign_rows = _local_entries(_entries(benign), len(hidden_data))
    size = 4 + max(len(_directory(rows, 0)) for rows in (hidden_rows, benign_rows))
    directories = _directory(hidden_rows, 0, size) + _directory(benign_rows, size, size)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(hidden_rows), len(hidden_rows), size,
                      len(hidden_data) + len(benign_data), 0)
    return hidden_data + benign_data + directories + end


def make_polyglot(folder: Path) -> tuple[Path, Path]:
    """(the crafted .pt, the victim file its hidden TorchScript overwrites when torch.load reads it)."""
    victim = folder / "victim.txt"
    victim.write_bytes(PRECIOUS)
    hidden = io.BytesIO()
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, and still what torch.load dispatches to
        torch.jit.save(torch.jit.script(Overwriter(str(victim))), hidden)
    benign = io.BytesIO()
    torch.save({"model": None, "train_args": {}}, benign)
    path = folder / "yolov8s-worldv2.pt"
    path.write_bytes(polyglot(benign.getvalue(), hidden.getvalue()))
    return path, victim


def tree_digest(*folders: Path) -> str:
    """A hash of every file's path and bytes under `folders`."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_the_polyglot_is_live_zipfile_sees_a_checkpoint_torch_load_runs_the_program(tmp_path):
    """Guards the test below: if the crafted file stopped firing, refusing it would prove nothing."""
    path, victim = make_polyglot(tmp_path)
    with zipfile.ZipFile(path) as z:
        assert sorted(n.split("/", 1)[1] for n in z.namelist()) == sorted(
            [".data/serialization_id", ".format_version", ".storage_alignment", "byteorder", "data.pkl", "version"])
    assert "constants.pkl" in torch._C.PyTorchFileReader(str(path)).get_all_records()
    with pytest.warns(UserWarning, match="dispatching to 'torch.jit.load'"), pytest.warns(FutureWarning):
        torch.load(path, weights_only=False)
    assert victim.read_bytes() == b"A" * 8, "torch.load ran the hidden program"


def test_the_polyglot_is_refused_by_every_load_path_and_nothing_is_written(tmp_path, tiny_text_encoder, capsys):
    path, victim = make_polyglot(tmp_path)
    home = Path(os.environ["OVDET_HOME"])
    before = tree_digest(tmp_path, home)
    with pytest.raises(WeightsUnsafeError, match="different contents"):
        load_checkpoint(path)
    with pytest.raises(WeightsUnsafeError, match="different contents"):
        OVDetector(path, text_model=tiny_text_encoder, device="cpu")
    for argv in (["weights", "import", str(path)], ["weights", "import", str(path), "--name", "x"],
                 ["detect", str(victim), "--model", str(path), "--classes", "a", "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ovdet: error:") and "different contents" in err and "Traceback" not in err
    assert victim.read_bytes() == PRECIOUS
    assert tree_digest(tmp_path, home) == before


def scripted_overwriter(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A victim file and a plain torch.jit.save archive (both zip readers agree) whose loading would overwrite it."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    path = tmp_path / name
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(Overwriter(str(victim))), str(path))
    return victim, path


def test_torchscript_is_refused_even_when_both_readers_agree(tmp_path):
    victim, path = scripted_overwriter(tmp_path, "model.pt")
    with pytest.raises(WeightsUnsafeError, match="TorchScript archive .*constants.pkl"):
        load_checkpoint(path)
    assert victim.read_bytes() == PRECIOUS


def test_a_torchscript_text_tower_that_would_run_code_is_refused_by_the_text_loader(tmp_path):
    from ovdet.text.tower import TextEncoder

    victim, path = scripted_overwriter(tmp_path, "ViT-B-32.pt")
    with pytest.raises(WeightsCorruptError, match="custom saved state"):
        TextEncoder.load(path)
    assert victim.read_bytes() == PRECIOUS


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_unpickler_itself_refuses_globals_outside_the_allowlist(tmp_path, monkeypatch):
    """With the opcode pre-scan switched off, the restricted unpickler is what stands between the file and
    os.system: it must refuse on its own."""
    import ovdet.weights.safepickle

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": _System(marker), "train_args": {}}, path)
    scans = []
    monkeypatch.setattr(ovdet.weights.safepickle, "scan_globals", lambda data: scans.append(len(data)) or set())
    with pytest.raises(WeightsUnsafeError) as exc:
        load_checkpoint(path)
    assert scans, "the pre-scan was bypassed"
    assert exc.value.names == [f"{os.system.__module__}.system"]
    assert not marker.exists()


def test_a_tensor_larger_than_its_storage_is_refused(tmp_path):
    """A stride-0 tensor claims a billion elements over one stored float; converting it would allocate 4 GB."""
    path = tmp_path / "expanded.pt"
    torch.save({"model": None, "x": torch.zeros(1).expand(10**9)}, path)
    with pytest.raises(WeightsCorruptError, match="malformed tensor"):
        load_checkpoint(path)


def zip_bomb(nbytes: int) -> bytes:
    """A torch.save-shaped archive whose float storage is `nbytes` zeros, deflated about 1000:1. Deflate restarts
    after a full flush, so every MiB of zeros compresses to the same bytes: the bomb is built without inflating."""
    small = io.BytesIO()
    torch.save({"x": torch.zeros(4)}, small)
    entries = _entries(small.getvalue())
    pickled = dict(entries)[f"{entries[0][0].split('/')[0]}/data.pkl"]
    assert pickled.count(b"K\x04") == 2  # the storage's numel and the tensor's size
    pickled = pickled.replace(b"K\x04", struct.pack("<cL", b"J", nbytes // 4))
    deflate, mib, crc = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20), 0
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    for _ in range(nbytes >> 20):
        crc = zlib.crc32(mib, crc)
    bomb = (entries[0][0].rsplit("/", 1)[0] + "/data/0", block * (nbytes >> 20) + deflate.flush(), crc, nbytes)
    return _zip([bomb if name.endswith("/data/0") else (name, pickled if name.endswith("/data.pkl") else data)
                 for name, data in entries])


def _peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_a_zip_bomb_is_refused_fast_with_bounded_memory(tmp_path):
    """512 MiB of zeros in a ~0.5 MB .pt: refused before anything is inflated. Linux's peak-RSS mark (VmHWM) is
    reset first, so the growth measured is this load's."""
    path = tmp_path / "bomb.pt"
    path.write_bytes(zip_bomb(512 << 20))
    assert path.stat().st_size < 1 << 20
    with zipfile.ZipFile(path) as z:  # a well-formed zip that really expands to 512 MiB
        assert sum(info.file_size for info in z.infolist()) > 512 << 20
    before = _reset_peak_rss()  # None where not Linux: the refusal and its speed are still checked
    start = time.perf_counter()
    with pytest.raises(WeightsCorruptError, match="zip bomb") as exc:
        load_checkpoint(path)
    seconds = time.perf_counter() - start
    grown = None if before is None else _peak_rss_mb() - before
    assert int(re.search(r"expand to (\d+) bytes", str(exc.value)).group(1)) >= 512 << 20
    assert seconds < 2 and (grown is None or grown < 200), (seconds, grown)


def test_big_endian_archives_load_the_same_values_as_torch_load(tmp_path):
    """The reader honours the archive's byteorder record as torch.load does (storages are swapped on load)."""
    values = {"a": torch.arange(6, dtype=torch.float32) / 3, "b": torch.arange(4, dtype=torch.int64) * 1000}
    little = io.BytesIO()
    torch.save(values, little)
    entries = _entries(little.getvalue())
    sizes = {name: 4 if name.endswith("/data/0") else 8 for name, _ in entries if "/data/" in name}

    def swapped(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if name in sizes:
            width = sizes[name]
            return b"".join(data[i:i + width][::-1] for i in range(0, len(data), width))
        return data

    path = tmp_path / "big.pt"
    path.write_bytes(_zip([(name, swapped(name, data)) for name, data in entries]))
    ours, theirs = load_checkpoint(path), torch.load(path, weights_only=True)
    for key, tensor in values.items():
        assert torch.equal(ours[key], tensor) and torch.equal(theirs[key], tensor), key


def _reset_peak_rss() -> float | None:
    """Reset Linux's peak-RSS mark (VmHWM) and return it in MB; None where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_mb()
    except OSError:
        return None


def test_a_memo_index_far_beyond_the_pickle_is_refused_before_unpickling(tmp_path):
    """CPython's unpickler grows its memo table to twice a PUT's index: 5 bytes (LONG_BINPUT 2**26) would make it
    fill 1 GB, 2**32 would fill 64 GB. The pickle scan refuses an index past the pickle's length first."""
    small = io.BytesIO()
    torch.save({}, small)
    entries = _entries(small.getvalue())
    bomb = b"\x80\x02}r" + struct.pack("<L", 1 << 26) + b"."
    path = tmp_path / "memo.pt"
    path.write_bytes(_zip([(name, bomb if name.endswith("/data.pkl") else data) for name, data in entries]))
    before = _reset_peak_rss()
    with pytest.raises(WeightsCorruptError, match=f"memo index {1 << 26} in a 9-byte pickle"):
        load_checkpoint(path)
    assert before is None or _peak_rss_mb() - before < 200


def test_the_absolute_size_bound_is_settable(tmp_path, monkeypatch):
    monkeypatch.setenv("OVDET_MAX_CHECKPOINT_BYTES", "1M")
    with pytest.raises(WeightsCorruptError, match=r"more than the 1048576-byte limit; raise OVDET_MAX_CHECKPOINT"):
        load_checkpoint(DEMO_FILE)
    monkeypatch.setenv("OVDET_MAX_CHECKPOINT_BYTES", "a lot")
    with pytest.raises(ModelError, match="OVDET_MAX_CHECKPOINT_BYTES='a lot' is not a size"):
        load_checkpoint(DEMO_FILE)


@pytest.mark.parametrize("damage", ["prepended", "appended", "comment", "duplicate", "renamed-local"])
def test_zips_that_readers_could_see_differently_are_refused(tmp_path, damage):
    good = io.BytesIO()
    torch.save({"model": None, "x": torch.ones(3)}, good)
    data = good.getvalue()
    if damage == "prepended":
        data = b"\0" * 64 + data
    elif damage == "appended":
        data += b"\0" * 64
    elif damage == "comment":
        data = data[:-2] + b"\x03\x00abc"
    elif damage == "duplicate":
        entries = _entries(data)
        data = _zip(entries + entries[-1:])
    else:
        data = data.replace(b"archive/data.pkl", b"archive/data.pkX", 1)  # local header only
    path = tmp_path / "damaged.pt"
    path.write_bytes(data)
    with pytest.raises((WeightsCorruptError, WeightsUnsafeError)):
        load_checkpoint(path)


FUZZ_CASES = 200  # 10-25 s on two shared cores: most end early in the zip checks, ~15% load the whole model


def _demo_layout(data: bytes) -> tuple[range, range, list[int]]:
    """Where the demo checkpoint's data.pkl bytes lie, where its zip directory and end records lie, and the
    offsets of its local headers: the bytes a loader parses (the rest are tensor values)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
    pkl = next(info for info in infos if info.filename.endswith("/data.pkl"))
    name_len, extra_len = struct.unpack("<2H", data[pkl.header_offset + 26:pkl.header_offset + 30])
    start = pkl.header_offset + 30 + name_len + extra_len
    directory = struct.unpack("<L", data[-6:-2])[0]
    return range(start, start + pkl.file_size), range(directory, len(data)), [i.header_offset for i in infos]


def mutations(data: bytes, seed: int, count: int):
    """`count` seeded byte-level mutations of `data`: (what was done, the mutated bytes). Flips, 32-bit field
    overwrites and splices land in the pickle (45%), the zip directory (30%), a local header (20%) or anywhere."""
    rng = random.Random(seed)
    pickle_bytes, directory, headers = _demo_layout(data)

    def where() -> int:
        roll = rng.random()
        if roll < 0.45:
            return rng.choice(pickle_bytes)
        if roll < 0.75:
            return rng.choice(directory)
        return rng.choice(headers) + rng.randrange(30) if roll < 0.95 else rng.randrange(len(data))

    for _ in range(count):
        mutated, kind = bytearray(data), rng.choice(["flip", "flip", "flip", "field", "splice", "truncate"])
        if kind == "flip":
            spots = [where() for _ in range(rng.randint(1, 4))]
            for at in spots:
                mutated[at] ^= rng.randrange(1, 256)
        elif kind == "field":
            spots = [where()]
            mutated[spots[0]:spots[0] + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, rng.randbytes(4)])
        elif kind == "splice":
            length, spots = rng.randint(1, 64), [where(), where()]
            mutated[spots[1]:spots[1] + length] = data[spots[0]:spots[0] + length]
        else:
            spots = [rng.randrange(len(data)) if rng.random() < 0.5 else rng.choice(directory)]
            del mutated[spots[0]:]
        yield f"{kind} at {spots}", bytes(mutated)


def test_mutated_demo_checkpoints_load_or_fail_with_an_ovdet_error(tmp_path):
    """FUZZ_CASES mutations of the demo model, each read by load_checkpoint + world_model_of: every one gives a
    model or an OVDetError, never another exception, memory stays bounded, and nothing is written anywhere."""
    home = Path(os.environ["OVDET_HOME"])
    before = tree_digest(home)
    path = tmp_path / "mutated.pt"
    outcomes, unexpected = {"model": 0, "refused": 0}, []
    threads, peak_before = torch.get_num_threads(), _reset_peak_rss()
    torch.set_num_threads(1)  # converting the model is 10x slower with threads on busy cores
    try:
        for what, data in mutations(DEMO_FILE.read_bytes(), seed=18, count=FUZZ_CASES):
            path.write_bytes(data)
            try:
                world_model_of(load_checkpoint(path), path)
                outcomes["model"] += 1
            except OVDetError:
                outcomes["refused"] += 1
            except Exception as exc:  # the failure this test looks for: report every one, with how to repeat it
                unexpected.append(f"{what}: {type(exc).__name__}: {exc}")
    finally:
        torch.set_num_threads(threads)
    assert not unexpected, "\n".join(unexpected[:10])
    # one mutated memo index made CPython's unpickler fill 22 GB before the pickle scan bounded it
    assert peak_before is None or _peak_rss_mb() - peak_before < 1024, _peak_rss_mb() - peak_before
    assert outcomes["model"] > 10 and outcomes["refused"] > FUZZ_CASES // 2, outcomes
    assert [p.name for p in tmp_path.iterdir()] == ["mutated.pt"] and tree_digest(home) == before
