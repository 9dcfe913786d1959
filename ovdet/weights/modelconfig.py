"""Model configs are data: a strict schema for the YOLO-World configs ovdet hands to ultralytics, built without eval.

ultralytics' `parse_model` turns a config into code: it `eval`s `activation`, looks layer names up in its module's
globals (any class there, e.g. DetectionModel, which builds a nested model from an argument) and replaces string
arguments that name its local variables with those variables (`"scales"`, `"d"`, ...). A config that reaches it
from a file (a model .yaml, the .json of a .safetensors pair, a checkpoint's `model.yaml`) could run code. Here a
config is checked against what YOLO-World v1/v2 configs hold: an explicit list of layers, literal arguments, the
two bare names they use (`nc`, an upsample mode), a `scales` table of numbers, an activation from a fixed list.
`build_world_model` builds a checked config with the activation set by ovdet, so ultralytics never evals it.
"""

from __future__ import annotations

import copy
import math
import re
import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from ovdet.errors import ModelError, WeightsCorruptError, WeightsUnsafeError

# The layers of ultralytics' yolov8-world.yaml and yolov8-worldv2.yaml (every scale), as configs spell them.
LAYERS: frozenset[str] = frozenset({"Conv", "C2f", "SPPF", "Concat", "C2fAttn", "ImagePoolingAttn", "WorldDetect",
                                    "nn.Upsample"})
# Activations a config may name, `nn.Name()` or `torch.nn.Name()`; those in _ACTIVATION_ARG take one number
# (e.g. `nn.LeakyReLU(0.1)`). None has parameters, so one shared instance (what parse_model makes) is exact.
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {name: getattr(torch.nn, name) for name in (
    "SiLU", "ReLU", "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "GELU", "Hardswish", "Hardsigmoid", "Mish",
    "Sigmoid", "Tanh", "Identity")}
_ACTIVATION_ARG = frozenset({"LeakyReLU", "ELU", "CELU"})
_ACTIVATION = re.compile(r"^\s*(?:torch\.)?nn\.([A-Za-z_]\w*)\("
                         r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)?\s*\)\s*$")
# String arguments: `nc` (parse_model substitutes the class count) and literals parse_model reads as such.
ARG_NAMES = frozenset({"nc"})
ARG_STRINGS = frozenset({"None", "True", "False", "nearest", "nearest-exact", "linear", "bilinear", "bicubic",
                         "trilinear", "area"})
# Top-level keys: what ultralytics' YOLO-World configs and the models built from them hold. `yaml_file` (the path
# or URL the config came from, which ultralytics' trainer would read again) is dropped.
KEYS = frozenset({"nc", "scales", "scale", "backbone", "head", "activation", "channels", "ch", "depth_multiple",
                  "width_multiple", "max_channels", "yaml_file"})
# Bounds no YOLO-World config comes near; they keep a crafted config from asking for absurd amounts of memory.
MAX_ARG = 4096  # a number in a layer's arguments (channels before scaling: at most 1024 in real configs)
MAX_REPEATS = 64  # a layer's repeat count (at most 6)
MAX_CLASSES = 100_000  # nc
MAX_GAIN = 4.0  # depth/width multiples (at most 1.25)
MAX_SMALL = 16  # the arguments after the first of these layers: kernel, stride, padding, groups, upsample factor
_SMALL_AFTER_FIRST = frozenset({"Conv", "SPPF", "nn.Upsample"})

_LITERAL = (int, float, str, bool, type(None))  # plain values (also what checkpoint metadata may keep as is)
_BUILD_LOCK = threading.Lock()  # Conv.default_act is process-wide state


def _unsafe(source: str, what: str, hint: str) -> WeightsUnsafeError:
    what = what if len(what) <= 400 else what[:400] + "..."  # a crafted value may be megabytes long
    return WeightsUnsafeError(
        f"{source}: its model config {what}; a YOLO-World config never does (ultralytics would run or build what it "
        "names), so nothing was built from it. Use an ultralytics YOLO-World config (yolov8{s,m,l,x}-world.yaml or "
        f"-worldv2.yaml) or a checkpoint built from one.{' ' + hint if hint else ''}")


def _number(value: Any, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def parse_activation(spec: Any) -> tuple[str, float | None]:
    """(class name, argument) of an `activation` spec such as "nn.SiLU()" or "nn.LeakyReLU(0.1)"; ValueError if it
    is not one of ACTIVATIONS in that form."""
    match = _ACTIVATION.match(spec) if isinstance(spec, str) else None
    if not match or match.group(1) not in ACTIVATIONS:
        raise ValueError(spec)
    name, arg = match.group(1), match.group(2)
    if arg is not None and (name not in _ACTIVATION_ARG or not math.isfinite(float(arg))):
        raise ValueError(spec)
    return name, None if arg is None else float(arg)


def activation_module(spec: str) -> torch.nn.Module:
    """The torch module an `activation` spec names, made by ovdet (never `eval`)."""
    name, arg = parse_activation(spec)
    return ACTIVATIONS[name]() if arg is None else ACTIVATIONS[name](arg)


def _check_arg(value: Any, limit: int, depth: int = 0) -> bool:
    if isinstance(value, (bool, type(None))):
        return True
    if isinstance(value, str):
        return value in ARG_NAMES or value in ARG_STRINGS
    if isinstance(value, list) and depth == 0:
        return all(_check_arg(v, limit, 1) for v in value)
    return _number(value, -limit, limit)


def _check_layer(row: Any, index: int, source: str, hint: str) -> None:
    if not (isinstance(row, list) and len(row) == 4):
        raise _unsafe(source, f"has a malformed layer {index}: {row!r} (expected [from, repeats, module, args])",
                      hint)
    origin, repeats, name, args = row
    if not isinstance(name, str) or name not in LAYERS:
        raise _unsafe(source, f"names layer {name!r} (layer {index}), which is not one of the YOLO-World layers "
                              f"{sorted(LAYERS)}", hint)
    origins = origin if isinstance(origin, list) else [origin]
    if not origins or not all(_int(o, -MAX_ARG, MAX_ARG) for o in origins):
        raise _unsafe(source, f"gives layer {index} ({name}) the input {origin!r} (layer indices only)", hint)
    if not _int(repeats, 1, MAX_REPEATS):
        raise _unsafe(source, f"repeats layer {index} ({name}) {repeats!r} times (1..{MAX_REPEATS})", hint)
    if not isinstance(args, list):
        raise _unsafe(source, f"gives layer {index} ({name}) the arguments {args!r} (a list expected)", hint)
    for position, arg in enumerate(args):
        limit = MAX_SMALL if position and name in _SMALL_AFTER_FIRST else MAX_ARG
        if not _check_arg(arg, limit):
            raise _unsafe(source, f"gives layer {index} ({name}) the argument {arg!r} (numbers up to {limit}, "
                                  f"booleans, None, {sorted(ARG_NAMES)} and upsample modes only)", hint)


def check_model_config(cfg: Any, source: str, hint: str = "") -> dict[str, Any]:
    """A copy of an ultralytics model config that builds a YOLO-World model without running code from it.

    WeightsUnsafeError names the first key or value outside the schema (module docstring); WeightsCorruptError when
    it is not a model config at all. The activation comes back in canonical form ("nn.LeakyReLU(0.1)"), so even
    code that evals it evals a string ovdet wrote. `yaml_file` is dropped. `hint` ends the error messages.
    """
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), list) or not isinstance(cfg.get("head"), list):
        raise WeightsCorruptError(f"{source}: the model config is not an ultralytics YOLO-World config (no "
                                  "backbone/head lists). Convert the checkpoint again with `ovdet weights convert`.")
    for key in cfg:
        if key not in KEYS:
            raise _unsafe(source, f"has the key {key!r} (value {cfg[key]!r}); allowed: {sorted(KEYS)}", hint)
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "yaml_file"}
    if "nc" in out and not _int(out["nc"], 1, MAX_CLASSES):
        raise _unsafe(source, f"has nc {out['nc']!r} (a class count 1..{MAX_CLASSES} expected)", hint)
    for key in ("channels", "ch"):
        if key in out and not _int(out[key], 1, 64):
            raise _unsafe(source, f"has {key} {out[key]!r} (image channels, e.g. 3)", hint)
    for key in ("depth_multiple", "width_multiple"):
        if key in out and not _number(out[key], 1e-3, MAX_GAIN):
            raise _unsafe(source, f"has {key} {out[key]!r} (a number in (0, {MAX_GAIN}])", hint)
    if "max_channels" in out and not _int(out["max_channels"], 1, MAX_ARG):
        raise _unsafe(source, f"has max_channels {out['max_channels']!r} (1..{MAX_ARG})", hint)
    scales = out.get("scales")
    if scales is not None:
        if not isinstance(scales, dict) or not scales:
            raise _unsafe(source, f"has scales {scales!r} (a table such as n: [0.33, 0.25, 1024])", hint)
        for letter, row in scales.items():
            if not (isinstance(letter, str) and re.fullmatch(r"[a-z]", letter) and isinstance(row, list)
                    and len(row) == 3 and _number(row[0], 1e-3, MAX_GAIN) and _number(row[1], 1e-3, MAX_GAIN)
                    and _int(row[2], 1, MAX_ARG)):
                raise _unsafe(source, f"has the scales entry {letter!r}: {row!r} (a scale letter: [depth, width, "
                                      f"max_channels] numbers expected)", hint)
    scale = out.get("scale")
    if scale not in (None, "") and not (isinstance(scale, str) and isinstance(scales, dict) and scale in scales):
        raise _unsafe(source, f"has scale {scale!r}, which is not a key of its scales", hint)
    if out.get("activation") is not None:
        try:
            name, arg = parse_activation(out["activation"])
        except ValueError:
            raise _unsafe(source, f"names activation {out['activation']!r} (only nn.Name() with Name one of "
                                  f"{sorted(ACTIVATIONS)}, e.g. nn.SiLU() or nn.LeakyReLU(0.1))", hint) from None
        out["activation"] = f"nn.{name}()" if arg is None else f"nn.{name}({arg!r})"
    rows = out["backbone"] + out["head"]
    if not rows:
        raise WeightsCorruptError(f"{source}: the model config has no layers.")
    for index, row in enumerate(rows):
        _check_layer(row, index, source, hint)
    return out


def _packaged_configs() -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "cfg" / "models"


def find_model_yaml(source: str | Path) -> Path:
    """The file a model yaml name or path means, found the way ultralytics finds it (never downloaded).

    An existing path is used as is; `yolov8s-worldv2.yaml` also finds `yolov8-worldv2.yaml` beside it (the scale
    letter picks a row of its scales); a bare name that is no local file is looked up in ultralytics' own configs.
    """
    text = str(source)
    if "://" in text:
        raise ModelError(f"Model config {text!r} is a URL: ovdet does not download model configs. Download it, "
                         "check it, and pass its path.")
    path = Path(text).expanduser()
    unified = path.with_name(re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.name))
    for candidate in (path, unified):
        if candidate.is_file():
            return candidate
    if path.name == text:  # a bare name: ultralytics' packaged configs
        for name in (path.name, unified.name):
            found = sorted(_packaged_configs().rglob(name))
            if found:
                return found[0]
    raise ModelError(f"Model config {text!r} not found: give a path or an ultralytics config name such as "
                     "'yolov8s-worldv2.yaml'.")


def read_model_yaml(source: str | Path, hint: str = "") -> dict[str, Any]:
    """The checked config of a model yaml (path or ultralytics config name), read with yaml.safe_load."""
    from ultralytics.nn.tasks import guess_model_scale

    path = find_model_yaml(source)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelError(f"Model config {path} could not be read as YAML ({type(exc).__name__}: {exc}).") from exc
    if isinstance(cfg, dict):
        cfg["scale"] = guess_model_scale(Path(str(source))) or cfg.get("scale")  # as ultralytics' yaml_model_load
    return check_model_config(cfg, str(path), hint)


def build_world_model(cfg: dict[str, Any], source: str, ch: int = 3, nc: int | None = None,
                      verbose: bool = False) -> Any:
    """A WorldModel from a config that passed check_model_config, its activation made by ovdet (ultralytics' builder
    never sees the string). WeightsCorruptError when the config does not build (bad layer wiring, sizes)."""
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.tasks import WorldModel

    cfg = check_model_config(cfg, source)  # idempotent; a caller cannot hand an unchecked dict by mistake
    spec = cfg.pop("activation", None)
    with _BUILD_LOCK:
        default = Conv.default_act
        try:
            if spec is not None:
                Conv.default_act = activation_module(spec)
            model = WorldModel(cfg, ch=ch, nc=nc, verbose=verbose)
        except (AssertionError, AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError,
                ZeroDivisionError) as exc:
            raise WeightsCorruptError(f"{source}: the model config does not build a YOLO-World model "
                                      f"({type(exc).__name__}: {str(exc)[:200]}).") from exc
        finally:
            Conv.default_act = default
    if spec is not None:
        model.yaml["activation"] = spec  # the config round-trips (checkpoints, safetensors pairs)
    return model
