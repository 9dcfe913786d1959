"""Unpickle a checkpoint's data.pkl with only allowlisted globals, its tensors read from the archive's own records.

ovdet does not call `torch.load` on files it does not trust: torch.load decides for itself what the archive is (it
hands TorchScript to torch.jit.load, which runs the program inside) and reads it with a pickle module that may
call anything. Instead the pickle bytes come from PyTorch's zip reader (ovdet.weights.torchzip, after the zip checks), and
this unpickler resolves only the globals in `ALLOWED_GLOBALS`; a persistent id ('storage', type, key, location,
numel) becomes the bytes of record data/KEY, whose size must match. Allowed classes are restored the way a pickle
restores any object (a bare instance, then its saved attributes): their constructors never run, so a file cannot
call e.g. `WorldModel("https://...yaml")`. Tensors may not be larger than their storage (no stride-0 blow-ups).
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import pickle
import pickletools
import re
import sys
from collections import OrderedDict
from typing import Any

import torch

from ovdet.errors import WeightsCorruptError
from ovdet.weights.torchzip import TorchArchive

# Every global a YOLO-World checkpoint's pickle names, as the file spells it. Derived from real checkpoints built
# from every YOLO-World config and from `ovdet train` output; tests/test_checkpoint.py re-derives it and checks
# that it is complete and minimal. The storage types are markers for a dtype, nothing is called.
ALLOWED_GLOBALS: frozenset[str] = frozenset({
    # containers and tensors (torch's own rebuild functions)
    "__builtin__.set", "collections.OrderedDict", "torch.Size",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage", "torch.HalfStorage", "torch.LongStorage",
    # torch layers of YOLO-World v1 and v2
    "torch.nn.modules.activation.SiLU", "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Identity", "torch.nn.modules.linear.Linear",
    "torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.pooling.AdaptiveMaxPool2d",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.upsampling.Upsample",
    # ultralytics layers and the model
    "ultralytics.nn.modules.block.BNContrastiveHead", "ultralytics.nn.modules.block.Bottleneck",
    "ultralytics.nn.modules.block.C2f", "ultralytics.nn.modules.block.C2fAttn",
    "ultralytics.nn.modules.block.ContrastiveHead", "ultralytics.nn.modules.block.DFL",
    "ultralytics.nn.modules.block.ImagePoolingAttn", "ultralytics.nn.modules.block.MaxSigmoidAttnBlock",
    "ultralytics.nn.modules.block.SPPF", "ultralytics.nn.modules.conv.Concat", "ultralytics.nn.modules.conv.Conv",
    "ultralytics.nn.modules.head.WorldDetect", "ultralytics.nn.tasks.WorldModel",
    # the training arguments ultralytics' trainer attaches to the model (model.args)
    "ultralytics.utils.IterableSimpleNamespace",
})
_MODULE_ALIASES = {"__builtin__": "builtins"}  # Python 2 names that protocol-2 pickles use
_KEY = re.compile(r"[0-9]{1,12}")  # torch.save names storages data/0, data/1, ...


class Refused(pickle.UnpicklingError):
    """A pickle asks for globals outside the allowlist; `names` are module.name as the file spells them."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def scan_globals(data: bytes) -> set[str]:
    """Every global (module.name) a pickle names, read opcode by opcode without unpickling anything.

    Raises ValueError for a malformed pickle, and for a memo index beyond the pickle's length: CPython's unpickler
    grows its memo table to twice the index it is given, so one 5-byte LONG_BINPUT could make it fill 64 GB.
    """
    found = set()
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        if opcode.name in ("GLOBAL", "INST"):
            found.add(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            found.add("<computed global>")  # torch never writes one; never in the allowlist
        elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > len(data):
            raise ValueError(f"memo index {arg} in a {len(data)}-byte pickle")
    return found


@functools.lru_cache(maxsize=None)
def _bare(cls: type) -> type:
    """A stand-in for `cls` that the unpickler may 'call' or instantiate: it returns `cls.__new__(cls)`, never
    running `cls.__init__`; the pickle's BUILD step then restores the saved attributes, as for any object."""

    def __new__(_standin, *args: Any, **kwargs: Any) -> Any:
        return cls.__new__(cls)

    return type(f"Bare{cls.__name__}", (), {"__new__": __new__, "__module__": __name__})


class _StorageType:
    """What a `torch.FloatStorage`-style global stands for in a pickle: the dtype of a storage record."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _malformed(source: str, why: str) -> WeightsCorruptError:
    return WeightsCorruptError(f"{source} holds a malformed tensor ({why}); torch.save never writes one. Download it "
                               "again, or import a good copy with `ovdet weights import PATH`.")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS (anything else raises Refused); storages come from `archive`'s records."""

    allowed: frozenset[str] = ALLOWED_GLOBALS

    def __init__(self, data: bytes, archive: TorchArchive):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self._storages: dict[str, torch.storage.TypedStorage] = {}
        byteorder = archive.read("byteorder") if "byteorder" in archive.sizes else b"little"
        if byteorder not in (b"little", b"big"):
            raise WeightsCorruptError(f"{archive.source} names byte order {byteorder[:20]!r}; torch writes 'little' "
                                      "or 'big'. The file is damaged: download it again.")
        self._swap = byteorder.decode() != sys.byteorder

    def find_class(self, module: str, name: str) -> Any:
        full_name = f"{module}.{name}"
        if full_name not in self.allowed:
            raise Refused([full_name])
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(torch.serialization.StorageType(name).dtype)
        if full_name == "torch._utils._rebuild_tensor_v2":
            return self._rebuild_tensor
        if full_name == "torch._utils._rebuild_parameter":
            return self._rebuild_parameter
        obj = getattr(importlib.import_module(_MODULE_ALIASES.get(module, module)), name)
        return _bare(obj) if isinstance(obj, type) and obj not in (set, OrderedDict, torch.Size) else obj

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        source = self.archive.source
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise _malformed(source, f"persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid  # the location (cuda:0, ...) is ignored: tensors load on the CPU
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and _KEY.fullmatch(key)
                and type(numel) is int and numel >= 0):
            raise _malformed(source, f"storage reference {str(pid)[:80]}")
        if key not in self._storages:
            untyped = self.archive.storage(key, numel * torch._utils._element_size(kind.dtype))
            if self._swap:
                untyped.byteswap(kind.dtype)
            self._storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)
        return self._storages[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                        hooks: Any, metadata: Any = None) -> torch.Tensor:
        """torch._utils._rebuild_tensor_v2 for a storage of this archive, a tensor no larger than it, no hooks."""
        source = self.archive.source
        if not isinstance(storage, torch.storage.TypedStorage) or hooks or metadata:
            raise _malformed(source, "not a storage of this archive, or with hooks or metadata")
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(type(v) is int and v >= 0 for v in (offset, *size, *stride))):
            raise _malformed(source, f"size {str(size)[:60]}, stride {str(stride)[:60]}, offset {str(offset)[:20]}")
        elements = storage._untyped_storage.nbytes() // torch._utils._element_size(storage.dtype)
        if offset + math.prod(size) > elements:
            raise _malformed(source, f"{math.prod(size)} elements from offset {offset} of a {elements}-element storage")
        try:
            return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad), OrderedDict())
        except RuntimeError as exc:  # strides that reach past the storage
            raise _malformed(source, str(exc).splitlines()[0][:120]) from exc

    def _rebuild_parameter(self, data: Any, requires_grad: Any, hooks: Any) -> torch.nn.Parameter:
        if not isinstance(data, torch.Tensor) or hooks:
            raise _malformed(self.archive.source, "a parameter without a tensor, or with hooks")
        return torch._utils._rebuild_parameter(data, bool(requires_grad), OrderedDict())


def unpickle_checkpoint(archive: TorchArchive) -> Any:
    """The object in `archive`'s data.pkl (its storages from data/N). Raises Refused naming every global outside
    the allowlist (found by a scan before anything is unpickled; the unpickler refuses them too), and
    WeightsCorruptError for a damaged pickle."""
    data = archive.read("data.pkl")
    try:
        refused = sorted(scan_globals(data) - ALLOWED_GLOBALS)
    except (ValueError, EOFError) as exc:  # pickletools: unknown opcode, truncated argument; our memo bound
        raise WeightsCorruptError(f"{archive.source}: its pickle is damaged ({exc}). Download it again, or import a "
                                  "good copy with `ovdet weights import PATH`.") from exc
    if refused:
        raise Refused(refused)
    try:
        return RestrictedUnpickler(data, archive).load()
    except (Refused, WeightsCorruptError):
        raise
    except Exception as exc:  # a damaged pickle fails in many ways (bad opcode, wrong arguments, bad BUILD state)
        raise WeightsCorruptError(f"{archive.source}: its pickle is damaged ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:160]}). Download it again, or import a good "
                                  "copy with `ovdet weights import PATH`.") from exc
