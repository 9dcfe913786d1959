"""Read a TorchScript archive's parameters and buffers without running TorchScript (OpenAI's CLIP .pt format).

torch.jit.load compiles the archive's code/ and runs the __setstate__ methods it defines: a crafted file can
overwrite any file the user can write (torch.from_file(..., shared=True)). Here data.pkl is unpickled by
ovdet.weights.safepickle's unpickler (bytes from PyTorch's zip reader, after ovdet.weights.torchzip's checks) in which every
`__torch__.*` class is an inert attribute holder; which attributes are parameters and buffers is read from the class
definitions in code/, read as text and never compiled; the holders are then walked as Module.state_dict walks
modules. The result equals `torch.jit.load(path).state_dict()`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ovdet.errors import WeightsCorruptError, WeightsUnsafeError
from ovdet.weights.safepickle import Refused, RestrictedUnpickler, scan_globals
from ovdet.weights.torchzip import TorchArchive

# Globals a TorchScript data.pkl may name besides its own `__torch__.*` classes: tensors, containers, and the
# jit's list and type-tag helpers (each returns its argument). Storage types are dtype markers.
SCRIPT_GLOBALS: frozenset[str] = frozenset({
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist", "torch.jit._pickle.build_doublelist",
    "torch.jit._pickle.build_boollist", "torch.jit._pickle.restore_type_tag",
    *(f"torch.{kind}Storage" for kind in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char",
                                          "Byte", "Bool")),
})
_MAX_DEPTH = 64  # module nesting; OpenAI's CLIP is 6 deep


class ScriptObject:
    """An object of a TorchScript class from the file: nothing but the state its pickle gave it."""

    __slots__ = ("state",)
    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ScriptUnpickler(RestrictedUnpickler):
    """RestrictedUnpickler over SCRIPT_GLOBALS, with `__torch__.*` classes as ScriptObject subclasses."""

    allowed = SCRIPT_GLOBALS

    def __init__(self, data: bytes, archive: TorchArchive):
        super().__init__(data, archive)
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module != "__torch__" and not module.startswith("__torch__."):
            return super().find_class(module, name)
        qualname = f"{module}.{name}"
        if qualname not in self._classes:
            self._classes[qualname] = type("ScriptObject", (ScriptObject,), {"__slots__": (), "qualname": qualname})
        return self._classes[qualname]


_CLASS = re.compile(r"^class (\w+)\(")
_LIST = re.compile(r"^\s+(__parameters__|__buffers__) = \[(.*)\]\s*$")


def _module_classes(archive: TorchArchive) -> dict[str, tuple[list[str], list[str]]]:
    """{qualified class name: (parameter names, buffer names)} for each module class defined in code/.

    TorchScript prints each module class as `class Name(Module):` followed by `__parameters__ = ["a", "b", ]` and
    `__buffers__ = [...]` lines; those lines are read as text (nothing is compiled, so the reader does not depend
    on the code being valid Python of this version).
    """
    classes: dict[str, tuple[list[str], list[str]]] = {}
    for record in archive.records:
        if not (record.startswith("code/__torch__") and record.endswith(".py")):
            continue
        module = "__torch__" + record[len("code/__torch__"):-len(".py")].replace("/", ".")
        current = None
        for line in archive.read(record).decode("utf-8", errors="replace").splitlines():
            if match := _CLASS.match(line):
                current = f"{module}.{match.group(1)}"
            elif current and (match := _LIST.match(line)):
                params, buffers = classes.setdefault(current, ([], []))
                (params if match.group(1) == "__parameters__" else buffers).extend(re.findall(r'"([^"]*)"',
                                                                                             match.group(2)))
    return classes


def torchscript_state_dict(archive: TorchArchive) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript module in `archive`, by dotted name, without running it.

    Raises WeightsUnsafeError when data.pkl names globals outside `__torch__.*` and SCRIPT_GLOBALS, and
    WeightsCorruptError when it cannot be read as modules with plain attribute state.
    """
    data = archive.read("data.pkl")
    try:
        refused = sorted(name for name in scan_globals(data) - SCRIPT_GLOBALS if not name.startswith("__torch__."))
    except (ValueError, EOFError) as exc:
        raise WeightsCorruptError(f"{archive.source}: its pickle is damaged ({exc}). Download it again.") from exc
    try:
        if refused:
            raise Refused(refused)
        root = _ScriptUnpickler(data, archive).load()
    except Refused as exc:
        raise WeightsUnsafeError(f"{archive.source} was refused: its TorchScript pickle names "
                                 f"{', '.join(exc.names[:5])}, which a TorchScript model's weights never need. "
                                 "Nothing from it was run.", names=exc.names) from None
    except WeightsCorruptError:
        raise
    except Exception as exc:  # a damaged pickle fails in many ways
        raise WeightsCorruptError(f"{archive.source}: its pickle is damaged ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:160]}). Download it again.") from exc
    classes = _module_classes(archive)
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", classes, out, archive.source, 0)
    return out


def _collect(obj: Any, prefix: str, classes: dict[str, tuple[list[str], list[str]]], out: dict[str, torch.Tensor],
             source: str, depth: int) -> None:
    """Module.state_dict's walk: this module's parameters, then its buffers, then each submodule in order."""
    where = prefix.rstrip(".") or "the root object"

    def corrupt(why: str) -> WeightsCorruptError:
        return WeightsCorruptError(f"{source}: {where} {why}, so its weights cannot be read without running it. "
                                   "ovdet reads TorchScript modules with plain attributes, such as OpenAI's CLIP.")

    if not isinstance(obj, ScriptObject) or obj.qualname not in classes:
        raise corrupt("is not a TorchScript module defined in the archive's code")
    if depth > _MAX_DEPTH:
        raise corrupt(f"is nested more than {_MAX_DEPTH} modules deep")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise corrupt("has custom saved state (a __getstate__)")
    params, buffers = classes[obj.qualname]
    for name in params + buffers:
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif value is not None:
            raise corrupt(f"has parameter {name} that is a {type(value).__name__}, not a tensor")
    for name, value in state.items():
        if isinstance(value, ScriptObject) and value.qualname in classes and name not in params + buffers:
            _collect(value, f"{prefix}{name}.", classes, out, source, depth + 1)
