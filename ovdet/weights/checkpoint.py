"""Read detector checkpoints without running code from the file: one zip reader, one allowlist, no torch.load.

A `.pt` file is a zip whose data.pkl is a pickle, and unpickling may call any function the file names (`os.system`,
...). `torch.load` also decides by itself what a zip is: a TorchScript archive goes to torch.jit.load, which runs the
program inside. So without trust ovdet never calls torch.load: ovdet.weights.torchzip opens the archive with PyTorch's own zip
reader after proving that Python's zipfile sees the same entries and that it cannot expand past a bound, refuses
TorchScript, and ovdet.weights.safepickle unpickles data.pkl from those bytes with only `ALLOWED_GLOBALS` (what YOLO-World
checkpoints hold) and the tensors from the same archive's records. `trust=True` is plain
`torch.load(weights_only=False)`: it runs code from the file, only for files you trust.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ovdet.errors import WeightsCorruptError, WeightsUnsafeError
from ovdet.weights.modelconfig import _LITERAL, build_world_model, check_model_config
from ovdet.weights.safepickle import ALLOWED_GLOBALS, Refused, scan_globals, unpickle_checkpoint
from ovdet.weights.torchzip import TorchArchive, opened

__all__ = ["ALLOWED_GLOBALS", "TEXT_ENCODER_KEY", "TRUST_HINT", "identify_weights", "load_checkpoint",
           "pickle_globals", "sam_state_dict", "world_model_of"]

TEXT_ENCODER_KEY = "ovdet_text_encoder"  # checkpoint key under which ovdet-trained models carry their text tower
PAIR_FORMAT = "ovdet-yolo-world/1"  # the "format" field of the .json beside a converted .safetensors

TRUST_HINT = ("If you trust this file and where it came from, pass --trust-weights (CLI) or trust_weights=True "
              "(Python): that runs code from the file, only for files you trust.")


def pickle_globals(path: Any) -> set[str]:
    """Every global (module.name) the pickles inside a torch zip checkpoint name, read without unpickling."""
    with opened(path) as archive:
        return set().union(*(_globals(archive, name) for name in archive.records if name.endswith(".pkl")))


def _globals(archive: TorchArchive, name: str) -> set[str]:
    try:
        return scan_globals(archive.read(name))
    except (ValueError, EOFError) as exc:  # pickletools: unknown opcode, truncated pickle
        raise WeightsCorruptError(f"{archive.source} has a damaged pickle {name} ({exc}). Download it again, or "
                                  "import a good copy with `ovdet weights import PATH`.") from exc


def _refuse_torchscript(archive: TorchArchive) -> None:
    marks = archive.torchscript_marks()
    if marks:
        raise WeightsUnsafeError(f"{archive.source} is a TorchScript archive (it holds {', '.join(marks[:3])}): "
                                 f"loading it runs the program it holds, and it is not a YOLO-World checkpoint. "
                                 f"{TRUST_HINT}")


def load_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """The object saved in a torch checkpoint (a zip), unpickled with only ALLOWED_GLOBALS; CPU tensors.

    Raises WeightsUnsafeError naming the globals outside the allowlist, for TorchScript, and for a zip that
    Python's and PyTorch's readers see differently (nothing from the file has run); WeightsCorruptError for a
    damaged, non-torch or legacy (pre-zip) file and for one that would expand past the size bound.
    `trust=True` loads with plain torch.load: it runs code.
    """
    path = Path(path)
    if trust:
        return _torch_load(path)
    with opened(path) as archive:
        _refuse_torchscript(archive)
        try:
            return unpickle_checkpoint(archive)
        except Refused as exc:  # named by the scan before unpickling, or by the unpickler itself
            raise _unsafe(path, exc.names) from None


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


def _torch_load(path: Path) -> Any:
    """Plain torch.load, for trusted files only: it runs code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch/zip/pickle raise many types for damaged archives; keep the cause
        raise WeightsCorruptError(
            f"{path} could not be loaded ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}). The "
            "file is damaged or was saved by an incompatible program: download it again or import a good copy "
            "with `ovdet weights import PATH`.") from exc


_CLIP_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection")


def _pickle_strings(archive: TorchArchive) -> set[str]:
    """The string constants of an archive's data.pkl (keys, attribute names), read without unpickling."""
    import pickletools

    try:
        return {arg for op, arg, _ in pickletools.genops(archive.read("data.pkl"))
                if isinstance(arg, str) and "UNICODE" in op.name}
    except (ValueError, EOFError) as exc:
        raise WeightsCorruptError(f"{archive.source} has a damaged pickle data.pkl ({exc}). Download it again, or "
                                  "import a good copy with `ovdet weights import PATH`.") from exc


def identify_weights(path: str | Path, trust: bool = False) -> str:
    """'detector' for a YOLO-World checkpoint, 'text' for a CLIP text tower file, 'segmenter' for a SAM-family
    state dict; raises for anything else.

    Reads the file as ovdet will (no code from it runs unless `trust`); for OpenAI's TorchScript CLIP file only
    the names inside its pickle are checked, since loading TorchScript runs the program it holds.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        load_safetensors_pair(path)
        return "detector"
    strings = None
    try:
        with opened(path) as archive:
            if archive.torchscript_marks():
                strings = {s.rsplit(".", 1)[-1] if "." in s else s for s in _pickle_strings(archive)}
    except (WeightsCorruptError, WeightsUnsafeError):
        if not trust:  # with trust, torch.load decides (e.g. a pre-1.6 torch.save file, not a zip)
            raise
    if strings is not None:
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
        if sam_state_dict(obj) is not None:
            return "segmenter"
    raise WeightsCorruptError(f"{path} is neither a YOLO-World checkpoint nor a CLIP text tower nor a SAM segmenter "
                              f"(it holds a {type(obj).__name__}); ovdet imports only those.")


def sam_state_dict(obj: Any) -> dict[str, Any] | None:
    """The weights of a SAM-family checkpoint (ultralytics' sam_b / mobile_sam / sam2.1_* files: a state dict,
    maybe under "model"), or None when `obj` is not one."""
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    keys = [str(k) for k in state]
    encoder = any(k.startswith("image_encoder.") for k in keys)
    decoder = any(k.startswith(("mask_decoder.", "sam_mask_decoder.")) for k in keys)
    return state if encoder and decoder else None


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
            model = build_world_model(cfg, str(config), nc=cfg.get("nc"))
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
