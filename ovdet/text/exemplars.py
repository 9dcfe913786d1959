"""Exemplar prompts: an image and a box standing for a class; `name=img@x1,y1,x2,y2` parsing, cache keys, fusion.

An `Exemplar` is checked when it is made (box shape and area, the file a regular file, an array a usable image)
and again when its pixels are first read (the box inside the image); every error names the class. Its identity is
the image's content hash, the box and the embedding source: the cache key of its embedding, whatever file name or
array object it came from. Embeddings come from `ovdet.model.region` (source "region", the detector's own region
embedding) or `ovdet.text.vision` (source "clip", CLIP's image tower); this module only combines them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovdet.errors import ClassSpecError, ImageReadError, InvalidImageError
from ovdet.media.sources import load_image
from ovdet.text.limits import check_text, limit
from ovdet.util.display import shown
from ovdet.util.hashing import cached_sha256

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_FUSE", "EXEMPLAR_SOURCES", "Exemplar", "check_count", "file_exemplar", "file_exemplars", "fuse",
           "label", "mean_embedding", "parse_exemplar", "resolved_source"]

EXEMPLAR_SOURCES = ("auto", "region", "clip")  # auto: region, which every detector's weights provide
DEFAULT_FUSE = 0.3  # the exemplars' share of a class that also has words (benchmarks/bench_exemplars.py: 0.2-0.3 best)
_BOX_TEXT = re.compile(r"[0-9eE.,+\- ]+")


def resolved_source(source: str) -> str:
    """The embedding source "auto" stands for: "region", the one every detector's weights provide."""
    return "region" if source == "auto" else source


class Exemplar:
    """An image (path, BGR ndarray or PIL image) and a box (pixels, x1 y1 x2 y2; None: the whole image) that
    show what a class looks like. `name` is the class it belongs to, `negative=True` makes it suppress boxes
    like a negative prompt, `source` picks the embedding ("auto" = "region", or "clip"), `weight` its share
    among the exemplars of its class."""

    __slots__ = ("name", "negative", "source", "weight", "box", "path", "_pixels", "_sha256")

    def __init__(self, image: Any, box: Sequence[float] | None = None, name: str | None = None,
                 negative: bool = False, source: str = "auto", weight: float = 1.0):
        self.name = _name(name, negative)
        self.negative = bool(negative)
        if source not in EXEMPLAR_SOURCES:
            raise self._error(f"source {source!r} is not one of {', '.join(EXEMPLAR_SOURCES)}")
        self.source = source
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            raise self._error(f"weight {weight!r} must be a positive number (its share among the class's exemplars)")
        self.weight = float(weight)
        self.box = None if box is None else self._box(box)
        self.path: Path | None = None
        self._pixels: np.ndarray | None = None
        self._sha256: str | None = None
        if isinstance(image, (str, os.PathLike)):
            self.path = Path(image).expanduser()
            self._check_file()
        else:
            try:
                pixels = np.array(load_image(image), copy=True)  # a copy: later edits of the caller's array do not
            except InvalidImageError as exc:                       # change what was hashed
                raise InvalidImageError(f"{self._who}: {exc}") from exc
            pixels.flags.writeable = False
            self._pixels = pixels
            self._check_inside(pixels.shape)

    # ------------------------------------------------------------------ checks

    @property
    def _who(self) -> str:
        kind = "negative exemplar" if self.negative else "exemplar"
        return f"{kind} of class {shown(self.name)!r}" if self.name else kind

    def _error(self, problem: str) -> ClassSpecError:
        return ClassSpecError(shown(f"{self._who}: {problem}"))

    def _box(self, box: Any) -> tuple[float, float, float, float]:
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            raise self._error(f"box {box!r} is not four numbers x1, y1, x2, y2 (pixels)") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise self._error(f"box {box!r} is not four finite numbers x1, y1, x2, y2 (pixels)")
        x1, y1, x2, y2 = values
        if x2 <= x1 or y2 <= y1:
            raise self._error(f"box {_box_text(values)} has zero area: give x1,y1,x2,y2 in pixels with x2 > x1 and "
                              "y2 > y1 (top-left corner first)")
        if x1 < 0 or y1 < 0:
            raise self._error(f"box {_box_text(values)} starts outside the image (negative coordinates): boxes are "
                              "pixels from the top-left corner")
        return x1, y1, x2, y2

    def _check_file(self) -> None:
        path = self.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageReadError(f"{self._who}: {shown(path)} does not exist; check the path") from None
        except OSError as exc:
            raise ImageReadError(f"{self._who}: {shown(path)} cannot be read ({shown(exc.strerror or exc)})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(f"{self._who}: {shown(path)} is not a regular file; give an image file")
        cap = limit("exemplar_bytes")
        if st.st_size > cap:
            raise ImageReadError(f"{self._who}: {shown(path)} is {st.st_size} bytes, more than the cap of {cap} for "
                                 "an exemplar image; crop it, or raise the cap with OVDET_MAX_EXEMPLAR_BYTES")
        if not os.access(path, os.R_OK):
            raise ImageReadError(f"{self._who}: {shown(path)}: permission denied; make the file readable")

    def _check_inside(self, shape: tuple[int, ...]) -> None:
        h, w = shape[:2]
        if self.box is not None and (self.box[2] > w or self.box[3] > h):
            raise self._error(f"box {_box_text(self.box)} reaches outside the {w}x{h} image: keep x2 <= {w} and "
                              f"y2 <= {h}")

    # ------------------------------------------------------------------ content

    def pixels(self) -> np.ndarray:
        """The image as BGR uint8 (read once, read-only), checked to hold the box."""
        if self._pixels is None:
            try:
                pixels = load_image(self.path)
            except ImageReadError as exc:
                raise ImageReadError(f"{self._who}: {exc}") from exc
            self._check_inside(pixels.shape)
            pixels.flags.writeable = False
            self._pixels = pixels
        return self._pixels

    def xyxy(self) -> tuple[float, float, float, float]:
        """The box in pixels; the whole image when none was given (reads the image)."""
        if self.box is not None:
            return self.box
        h, w = self.pixels().shape[:2]
        return 0.0, 0.0, float(w), float(h)

    def crop(self) -> np.ndarray:
        """The boxed part of the image (BGR uint8), at least one pixel."""
        x1, y1, x2, y2 = self.xyxy()
        img = self.pixels()
        left, top = int(math.floor(x1)), int(math.floor(y1))
        right, bottom = max(int(math.ceil(x2)), left + 1), max(int(math.ceil(y2)), top + 1)
        return img[top:bottom, left:right]

    @property
    def sha256(self) -> str:
        """sha256 of the image: of the file's bytes (memoized by path and times), or of an array's pixels."""
        if self._sha256 is None:
            if self.path is not None:
                try:
                    self._sha256 = _file_sha256(self.path)
                except OSError as exc:
                    raise ImageReadError(f"{self._who}: {shown(self.path)} cannot be read "
                                         f"({shown(exc.strerror or exc)})") from exc
            else:
                pixels = self._pixels
                digest = hashlib.sha256(f"bgr{pixels.shape[0]}x{pixels.shape[1]}\0".encode())
                digest.update(pixels.tobytes())
                self._sha256 = digest.hexdigest()
        return self._sha256

    @property
    def key(self) -> str:
        """What the embedding depends on besides the model: image content, box and source (the cache key)."""
        box = "full" if self.box is None else _box_text(self.box)
        return f"{resolved_source(self.source)}:{self.sha256}@{box}"

    def record(self) -> dict[str, Any]:
        """A JSON-ready description (for run.json): class, image, its sha256, box, source, weight, negative."""
        return {"class": self.name, "negative": self.negative,
                "image": "<array>" if self.path is None else str(self.path), "sha256": self.sha256,
                "box": None if self.box is None else list(self.box), "source": resolved_source(self.source),
                "weight": self.weight}

    def describe(self) -> str:
        """Short human-readable form: `ref.jpg@10,20,50,60` (region)."""
        image = "<array>" if self.path is None else self.path.name
        box = "" if self.box is None else "@" + _box_text(self.box)
        return f"{'!' if self.negative else ''}{shown(image)}{box} ({resolved_source(self.source)})"

    def _identity(self) -> tuple:
        return (self.name, self.negative, self.weight, self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Exemplar) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        return f"Exemplar({self.describe()}{name})"


_HASHES: dict[tuple, str] = {}  # this process's file hashes by (path, size, times, inode): a warm set_classes
_HASHES_KEPT = 4096              # with many exemplars does one stat per file, no disk memo read


def _file_sha256(path: Path) -> str:
    """sha256 of a file: remembered in this process by one stat, else ovdet.util.hashing.cached_sha256."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    digest = _HASHES.get(key)
    if digest is None:
        digest = cached_sha256(path)
        if len(_HASHES) >= _HASHES_KEPT:
            _HASHES.clear()
        _HASHES[key] = digest
    return digest


class _Naming:
    """Where check_text's errors about an exemplar's class name come from."""

    @staticmethod
    def error(problem: str) -> ClassSpecError:
        return ClassSpecError(f"exemplar: {problem}")


_NAMING = _Naming()


def _name(name: Any, negative: bool) -> str | None:
    if name is None:
        if not negative:
            raise ClassSpecError("An exemplar needs the name of the class it shows: Exemplar('ref.jpg', box=(...), "
                                 "name='pallet jack') (or negative=True for one that suppresses boxes).")
        return None
    if not isinstance(name, str):
        raise ClassSpecError(f"An exemplar's class name must be a string, got {type(name).__name__} {name!r}.")
    name = name.strip()
    if not name:
        raise ClassSpecError("An exemplar's class name is blank: name the class it shows, e.g. 'pallet jack'.")
    return check_text(name, "class name", _NAMING)


def _box_text(box: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in box)


def _split_box(image: str, text: str) -> tuple[str, list[float] | None]:
    """`IMAGE@x1,y1,x2,y2` → (IMAGE, box); an `@` not followed by numbers is part of the file name."""
    at = image.rfind("@")
    if at < 0 or not _BOX_TEXT.fullmatch(image[at + 1:]):
        return image, None
    box_text = image[at + 1:]
    try:
        box = [float(p) for p in box_text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ClassSpecError(shown(f"Exemplar {text!r}: the box {box_text!r} is not four numbers x1,y1,x2,y2 "
                                   "(pixels), e.g. @10,20,200,180"))
    return image[:at], box


def parse_exemplar(text: str, base: str | os.PathLike | None = None, source: str = "auto") -> Exemplar:
    """`NAME=IMAGE[@x1,y1,x2,y2]` (CLI and inline form) as an Exemplar; a leading `!` makes it negative (its name
    may then be empty: `!=glare.jpg`). A relative IMAGE is taken relative to `base` when given."""
    if not isinstance(text, str):
        raise ClassSpecError(f"An exemplar is written NAME=IMAGE[@x1,y1,x2,y2], got {type(text).__name__} {text!r}.")
    body = text.strip()
    negative = body.startswith("!")
    body = body[1:] if negative else body
    name, eq, rest = body.partition("=")
    if not eq or not rest.strip():
        raise ClassSpecError(shown(f"Exemplar {text!r} is not NAME=IMAGE[@x1,y1,x2,y2]: e.g. "
                                   f"'pallet jack=ref.jpg@10,20,200,180' (pixels), or 'pallet jack=crop.jpg' for a "
                                   "whole image; '!=glare.jpg@...' for a negative one."))
    image, box = _split_box(rest.strip(), text)
    path = Path(image).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return Exemplar(path, box=box, name=name.strip() or None, negative=negative, source=source)


def check_count(count: int, where: Any) -> None:
    """Refuse more exemplars than the cap (each is an image to decode and embed)."""
    cap = limit("exemplars")
    if count > cap:
        raise where.error(f"the spec names at least {count} exemplars, more than the cap of {cap}; if you mean it, "
                          f"raise the cap with the environment variable OVDET_MAX_EXEMPLARS={count}")


def label(exemplars: Sequence[Exemplar], share: float | None = None) -> str:
    """How a class's exemplars show in tables and row labels: `[exemplar ref.jpg@1,2,3,4 (region)]`,
    `[3 exemplars (region), share 0.5]`."""
    if len(exemplars) == 1:
        text = f"exemplar {exemplars[0].describe()}"
    else:
        sources = ", ".join(dict.fromkeys(resolved_source(e.source) for e in exemplars))
        text = f"{len(exemplars)} exemplars ({sources})"
    return f"[{text}{'' if share is None else f', share {share:g}'}]"


_ITEM_KEYS = ("image", "box", "source", "weight", "negative")


def file_exemplars(value: Any, where: Any, name: str | None) -> list[Exemplar]:
    """The `exemplars:` of a class in a class file (`where`: an ovdet.text.class_files.Where): a list of
    `IMAGE[@x1,y1,x2,y2]` strings (`!` first: negative) or mappings {image, box, source, weight, negative}.
    Images are files inside the class file's folder, named relative to it; errors give the file and line."""
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise where.error("exemplars must be a list such as [{image: ref.jpg, box: [10, 20, 200, 180]}]")
    return [file_exemplar(item, where.at(f"{where.path}[{i}]", _line_of(items, i)), name)
            for i, item in enumerate(items)]


def file_exemplar(item: Any, where: Any, name: str | None, negative: bool = False) -> Exemplar:
    """One exemplar item of a class file (see file_exemplars); `negative` makes it negative whatever it says."""
    image, options = _file_item(item, where)
    options["negative"] = options["negative"] or negative
    path = _inside_folder(image, where)
    try:
        return Exemplar(path, name=None if options["negative"] and name is None else name, **options)
    except (ClassSpecError, ImageReadError) as exc:  # a bad box or image: say where the class file names it
        raise where.error(str(exc)) from exc


def _line_of(container: Any, key: Any) -> int | None:
    lines = getattr(container, "lines", None)
    return lines[key] if isinstance(lines, list) and isinstance(key, int) and key < len(lines) else None


def _file_item(item: Any, where: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        negative = item.strip().startswith("!")
        try:
            image, box = _split_box(item.strip().lstrip("!").strip(), item)
        except ClassSpecError as exc:
            raise where.error(str(exc)) from exc
        options: dict[str, Any] = {"box": box, "negative": negative}
    elif isinstance(item, Mapping):
        unknown = [k for k in item if k not in _ITEM_KEYS]
        if unknown:
            raise where.error(f"unknown key {unknown[0]!r} in an exemplar: allowed keys are {', '.join(_ITEM_KEYS)}")
        if not isinstance(item.get("image"), str) or not item["image"].strip():
            raise where.error("an exemplar needs image: PATH (relative to the class file)")
        image = item["image"].strip()
        options = {k: item[k] for k in ("box", "source", "weight") if k in item}
        negative = item.get("negative", False)
        if not isinstance(negative, bool):
            raise where.error(f"negative must be true or false, got {negative!r}")
        options["negative"] = negative
    else:
        raise where.error(f"an exemplar is IMAGE[@x1,y1,x2,y2] or {{image: ..., box: [...]}}, got "
                          f"{type(item).__name__} {item!r}")
    return image, options


def _inside_folder(image: str, where: Any) -> Path:
    """A class file's exemplar image: a relative path resolved against the class file's folder that stays inside
    it (links followed), so a class file from elsewhere cannot point ovdet at any file on the machine."""
    base = Path(where.file).parent if where.file else Path.cwd()
    path = Path(image)
    if path.is_absolute() or image.startswith("~"):
        raise where.error(f"exemplar image {image!r} is an absolute path: in a class file, images are named relative "
                          "to it (put them in its folder); use --exemplar or ovdet.Exemplar for images elsewhere")
    full = base / path
    real, root = Path(os.path.realpath(full)), Path(os.path.realpath(base))
    if real != root and root not in real.parents:
        raise where.error(f"exemplar image {image!r} is outside the class file's folder {shown(base)}: keep the "
                          "images in that folder (or below it), or use --exemplar / ovdet.Exemplar for others")
    return full


def mean_embedding(vectors: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """One class embedding [D] from exemplar embeddings [M, D]: their (weighted) mean, L2-normalised."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"mean_embedding needs [M, D] embeddings with M >= 1, got {tuple(vectors.shape)}")
    import torch
    import torch.nn.functional as F

    w = torch.ones(len(vectors)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    mean = (F.normalize(vectors.float(), dim=-1) * w.to(vectors.device)[:, None]).sum(0)
    return F.normalize(mean, dim=0)


def fuse(text_rows: torch.Tensor, exemplar: torch.Tensor, share: float = DEFAULT_FUSE) -> torch.Tensor:
    """Text embeddings [K, D] of a class fused with its exemplar embedding [D]: each row becomes
    normalize((1 - share) · text + share · exemplar). share 0 keeps the words, 1 the exemplars."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    import torch.nn.functional as F

    return F.normalize((1.0 - share) * F.normalize(text_rows.float(), dim=-1) + share * exemplar.float()[None],
                       dim=-1)
