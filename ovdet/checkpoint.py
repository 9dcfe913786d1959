"""Read detector checkpoints without running code from the file: one allowlist, a restricted unpickler.

A `.pt` file is a pickle, and unpickling may call any function the file names (`os.system`, ...). ovdet reads
checkpoints with `torch.load` and a pickle module whose unpickler resolves only the globals in `ALLOWED_GLOBALS`:
what YOLO-World checkpoints (v1/v2, s/m/l/x, ultralytics' trainer layout, `ovdet train` output) hold, nothing else.
Allowed classes are restored the way a pickle restores any object (a bare instance, then its saved attributes):
their constructors never run, so a file cannot call e.g. `WorldModel("https://...yaml")`, which builds from a
downloaded config. `torch.load(weights_only=True)` + `add_safe_globals` would let a file call allowed classes with
arguments of its choosing, and that allowlist is process-global state other libraries add to.
`trust=True` is plain `torch.load(weights_only=False)`: it runs code from the file, only for files you trust.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import logging
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ovdet.errors import WeightsCorruptError, WeightsUnsafeError

TEXT_ENCODER_KEY = "ovdet_text_encoder"  # checkpoint key under which ovdet-trained models carry their text tower
PAIR_FORMAT = "ovdet-yolo-world/1"  # the "format" field of the .json beside a converted .safetensors

# Every global a YOLO-World checkpoint's pickle names, as the file spells it. Derived from real checkpoints built
# from every YOLO-World config and from `ovdet train` output; tests/test_checkpoint.py re-derives it and checks
# that it is complete and minimal. Storage types are resolved by torch itself, before this list is consulted.
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
# Functions the unpickler may call (with arguments from the file): torch's tensor rebuilders and containers.
_CALLABLE = frozenset({"__builtin__.set", "collections.OrderedDict", "torch.Size", "torch._utils._rebuild_parameter",
                       "torch._utils._rebuild_tensor_v2"})
_MODULE_ALIASES = {"__builtin__": "builtins"}  # Python 2 names that protocol-2 pickles use

TRUST_HINT = ("If you trust this file and where it came from, pass --trust-weights (CLI) or trust_weights=True "
              "(Python): that runs code from the file, only for files you trust.")


def _resolve(full_name: str) -> Any:
    module, _, name = full_name.rpartition(".")
    return getattr(importlib.import_module(_MODULE_ALIASES.get(module, module)), name)


@functools.lru_cache(maxsize=None)
def _bare(cls: type) -> type:
    """A stand-in for `cls` that the unpickler may 'call' or instantiate: it returns `cls.__new__(cls)`, never
    running `cls.__init__`; the pickle's BUILD step then restores the saved attributes, as for any object."""

    def __new__(_standin, *args: Any, **kwargs: Any) -> Any:
        return cls.__new__(cls)

    return type(f"Bare{cls.__name__}", (), {"__new__": __new__, "__module__": __name__})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS; anything else raises WeightsUnsafeError naming it."""

    def find_class(self, module: str, name: str) -> Any:
        full_name = f"{module}.{name}"
        if full_name not in ALLOWED_GLOBALS:
            raise _Refused(full_name)
        obj = _resolve(full_name)
        return obj if full_name in _CALLABLE or not isinstance(obj, type) else _bare(obj)


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _RestrictedPickle:
    """The `pickle_module` handed to torch.load: the restricted unpickler, and `load` for legacy files."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "ovdet.checkpoint._RestrictedPickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def pickle_globals(path: str | Path) -> set[str]:
    """Every global (module.name) the pickles inside a torch zip checkpoint name, read without unpickling."""
    found = set()
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            if not entry.endswith(".pkl"):
                continue
            for opcode, arg, _ in pickletools.genops(io.BytesIO(archive.read(entry))):
                if opcode.name in ("GLOBAL", "INST"):
                    found.add(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    found.add("<computed global>")  # torch never writes one; refused below
    return found


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold code/ and constants.pkl; torch.load would hand them to torch.jit.load."""
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def load_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """The object saved in a torch checkpoint (a zip), unpickled with only ALLOWED_GLOBALS; CPU tensors.

    Raises WeightsUnsafeError naming the first global outside the allowlist (nothing from the file has run), and
    WeightsCorruptError for a damaged or non-torch file. `trust=True` loads with plain pickle: it runs code.
    """
    path = Path(path)
    if trust:
        return _torch_load(path, weights_only=False)
    if not zipfile.is_zipfile(path):
        raise WeightsCorruptError(f"{path} is not a readable PyTorch checkpoint (truncated download or wrong file). "
                                  "Delete it and download it again, or import a good copy with "
                                  "`ovdet weights import PATH`.")
    try:
        torchscript = _is_torchscript(path)
        names = sorted(pickle_globals(path) - ALLOWED_GLOBALS)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise WeightsCorruptError(f"{path} is a damaged checkpoint ({type(exc).__name__}: {exc}). Download it "
                                  "again, or import a good copy with `ovdet weights import PATH`.") from exc
    if torchscript:
        raise WeightsUnsafeError(f"{path} is a TorchScript archive: loading it runs the program it holds, and it is "
                                 f"not a YOLO-World checkpoint. {TRUST_HINT}")
    if names:
        raise _unsafe(path, names)
    try:
        return _torch_load(path, weights_only=False, pickle_module=_RestrictedPickle)
    except _Refused as exc:  # the scan above should have caught it; the unpickler is the last word
        raise _unsafe(path, [exc.name]) from None


def world_model_of(ckpt: Any, path: Path) -> Any:
    """The YOLO-World model inside a loaded checkpoint (its EMA, else its model), in float32; WeightsCorruptError
    when there is none or it is not a complete model (e.g. a bare instance a crafted file asked for)."""
    from ultralytics.nn.tasks import WorldModel

    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, WorldModel):
        kind = type(model).__name__ if model is not None else type(ckpt).__name__
        raise WeightsCorruptError(
            f"{path} holds a {kind}, not a YOLO-World model. ovdet needs a YOLO-World checkpoint such as "
            "yolov8s-worldv2.pt, or one written by `ovdet train`.")
    try:
        model = model.float()
        model.state_dict()
        _ = model.model[-1], model.yaml, model.txt_feats
    except Exception as exc:  # a module restored without its attributes fails in many ways
        raise WeightsCorruptError(f"{path} holds an incomplete YOLO-World model ({type(exc).__name__}: {exc}). "
                                  "Download it again, or import a good copy.") from exc
    return model


def _unsafe(path: Path, names: list[str]) -> WeightsUnsafeError:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return WeightsUnsafeError(
        f"{path} was refused: unpickling it would use {shown}, which a YOLO-World checkpoint never needs (a file "
        f"that names such globals can run any program on this machine). Nothing from the file was run. "
        f"{TRUST_HINT}", names=names)


def _torch_load(path: Path, **kwargs: Any) -> Any:
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except (WeightsUnsafeError, _Refused):
        raise
    except Exception as exc:  # torch/zip/pickle raise many types for damaged archives; keep the cause
        raise WeightsCorruptError(
            f"{path} could not be loaded ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}). The "
            "file is damaged or was saved by an incompatible program: download it again or import a good copy "
            "with `ovdet weights import PATH`.") from exc



_CLIP_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection")


def _pickle_strings(path: Path) -> set[str]:
    """The string constants of the pickles in a zip archive (keys, attribute names), read without unpickling."""
    found = set()
    with zipfile.ZipFile(path) as archive:
        for entry in (n for n in archive.namelist() if n.endswith("data.pkl")):
            found.update(arg for op, arg, _ in pickletools.genops(io.BytesIO(archive.read(entry)))
                         if isinstance(arg, str) and "UNICODE" in op.name)
    return found


def identify_weights(path: str | Path, trust: bool = False) -> str:
    """'detector' for a YOLO-World checkpoint, 'text' for a CLIP text tower file; raises for anything else.

    Reads the file as ovdet will (no code from it runs unless `trust`); for OpenAI's TorchScript CLIP file only
    the names inside its pickle are checked, since loading TorchScript runs the program it holds.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        load_safetensors_pair(path)
        return "detector"
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        strings = {s.rsplit(".", 1)[-1] if "." in s else s for s in _pickle_strings(path)}
        if {"token_embedding", "positional_embedding", "text_projection"} <= strings:
            return "text"
        raise WeightsCorruptError(f"{path} is a TorchScript archive but not OpenAI's CLIP (no text tower inside).")
    obj = load_checkpoint(path, trust=trust)
    if isinstance(obj, dict):
        if obj.get("ema") is not None or obj.get("model") is not None:
            world_model_of(obj, path)
            return "detector"
        state = obj.get("state_dict", obj)
        if isinstance(state, dict) and all(any(str(k).endswith(key) for k in state) for key in _CLIP_KEYS):
            return "text"
    raise WeightsCorruptError(f"{path} is neither a YOLO-World checkpoint nor a CLIP text tower (it holds a "
                              f"{type(obj).__name__}); ovdet imports only those.")


_ACTIVATION = re.compile(r"^(?:torch\.)?nn\.([A-Za-z_]\w*)\(\)$")
_LITERAL = (int, float, str, bool, type(None))


def check_model_config(cfg: Any, source: str) -> dict[str, Any]:
    """A copy of an ultralytics model config (the yaml dict a checkpoint carries) that builds without running code.

    ultralytics' builder `eval`s the `activation` entry and calls the layer names it finds; a config from a file
    could name anything. Allowed: an activation of the form `nn.Name()`, layers that are torch.nn or ultralytics
    nn.Module classes, literal arguments. `yaml_file` (a path or URL ultralytics would fetch) is dropped.
    """
    from ultralytics.nn import tasks

    def bad(why: str) -> WeightsUnsafeError:
        return WeightsUnsafeError(f"{source}: its model config {why}; a YOLO-World config never does. {TRUST_HINT}")

    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), list) or not isinstance(cfg.get("head"), list):
        raise WeightsCorruptError(f"{source}: the model config is not an ultralytics YOLO-World config "
                                  "(no backbone/head lists). Convert the checkpoint again with `ovdet weights convert`.")
    act = cfg.get("activation")
    if act is not None:
        match = _ACTIVATION.match(str(act))
        layer = getattr(torch.nn, match.group(1), None) if match else None
        if not (isinstance(layer, type) and issubclass(layer, torch.nn.Module)):
            raise bad(f"names activation {act!r} (only nn.Name() is allowed)")
    for row in cfg["backbone"] + cfg["head"]:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[2], str) and isinstance(row[3], list)):
            raise bad(f"has a malformed layer {row!r}")
        name = row[2]
        layer = getattr(torch.nn, name[3:], None) if name.startswith("nn.") else getattr(tasks, name, None)
        if not (isinstance(layer, type) and issubclass(layer, torch.nn.Module)):
            raise bad(f"names layer {name!r}, which is not a torch or ultralytics layer")
        if not _plain(row[3]) or not _plain(row[0]) or not isinstance(row[1], int):
            raise bad(f"gives layer {name!r} non-literal arguments")
    return {k: v for k, v in cfg.items() if k != "yaml_file"}


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _LITERAL)


def _json_safe(value: Any) -> Any:
    """Plain JSON data from checkpoint metadata (train_args and the like); anything else becomes its str()."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, _LITERAL) else str(value)


def convert_to_safetensors(src: str | Path, dest: str | Path | None = None, trust: bool = False) -> Path:
    """Write a YOLO-World checkpoint as DEST.safetensors (tensors only) + DEST.json (config, names, metadata).

    The pair holds no pickle: loading it cannot run code. `dest` defaults to SRC without its suffix.
    """
    from safetensors.torch import save_file

    src = Path(src)
    ckpt = load_checkpoint(src, trust=trust)
    model = world_model_of(ckpt, src)
    stem = Path(dest) if dest is not None else src.with_suffix("")
    stem = stem.with_suffix("") if stem.suffix in (".safetensors", ".json") else stem
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tensors["txt_feats"] = model.txt_feats.detach().cpu().contiguous().clone()
    text = ckpt.get(TEXT_ENCODER_KEY)
    if text is not None:
        tensors.update({f"{TEXT_ENCODER_KEY}.{k}": v.detach().cpu().contiguous().clone()
                        for k, v in text["state_dict"].items()})
    meta = {"format": PAIR_FORMAT, "source": src.name, "config": check_model_config(model.yaml, str(src)),
            "names": {str(k): str(v) for k, v in (model.names or {}).items()},
            "train_args": _json_safe(ckpt.get("train_args") or {}),
            TEXT_ENCODER_KEY: None if text is None else {"name": str(text["name"]), "config": _json_safe(text["config"])}}
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, config = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    for target, write in ((weights, lambda p: save_file(tensors, str(p), metadata={"format": PAIR_FORMAT})),
                          (config, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return weights


def load_safetensors_pair(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """A YOLO-World model from NAME.safetensors + NAME.json, and a checkpoint-like dict (train_args, text tower)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from ultralytics.nn.tasks import WorldModel

    path = Path(path)
    config = path.with_suffix(".json")
    if not config.is_file():
        raise WeightsCorruptError(f"{path} needs its config {config.name} beside it (both are written by "
                                  "`ovdet weights convert`): copy it next to the .safetensors file.")
    try:
        meta = json.loads(config.read_text())
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise WeightsCorruptError(f"{path} or {config.name} cannot be read ({type(exc).__name__}: {exc}). Convert "
                                  "the checkpoint again with `ovdet weights convert`.") from exc
    if not isinstance(meta, dict) or meta.get("format") != PAIR_FORMAT:
        raise WeightsCorruptError(f"{config} is not an ovdet model config (format {PAIR_FORMAT!r} expected).")
    cfg = check_model_config(meta.get("config"), str(config))
    try:
        with _quiet_ultralytics():
            model = WorldModel(cfg, nc=cfg.get("nc"), verbose=False)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise WeightsCorruptError(f"{config}: the model config does not build a YOLO-World model "
                                  f"({type(exc).__name__}: {exc}). Convert the checkpoint again.") from exc
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsCorruptError(f"{path} does not match its config {config.name}: {str(exc)[:300]}") from exc
    if "txt_feats" in tensors:
        model.txt_feats = tensors["txt_feats"].float()
    model.names = {int(k): v for k, v in (meta.get("names") or {}).items()}
    ckpt: dict[str, Any] = {"train_args": meta.get("train_args") or {}}
    text = meta.get(TEXT_ENCODER_KEY)
    if text is not None:
        prefix = f"{TEXT_ENCODER_KEY}."
        ckpt[TEXT_ENCODER_KEY] = {"name": text.get("name"), "config": text.get("config"),
                                  "state_dict": {k[len(prefix):]: v for k, v in tensors.items()
                                                 if k.startswith(prefix)}}
    return model.float().eval(), ckpt


class _quiet_ultralytics:
    """Silence ultralytics' model-summary logging while building from yaml."""

    def __enter__(self):
        from ultralytics.utils import LOGGER

        self.logger, self.level = LOGGER, LOGGER.level
        LOGGER.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
