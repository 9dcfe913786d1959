"""A generated world: seeded YOLO-format datasets of coloured shapes ("red circle", "blue square") on clutter.

With masks, every object also has its exact instance mask (the shape filled without anti-aliasing, minus what later
objects cover) and the labels are YOLO segment lines, so mask quality can be measured offline.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from ovdet.errors import DatasetError
from ovdet.masks.base import MaskPart
from ovdet.masks.rle import mask_polygon, yolo_segment
# the palette, shapes and default vocabulary are defined in ovdet.options, so that the CLI parser needs no OpenCV
from ovdet.options import SYNTH_DEFAULT_COLOURS as DEFAULT_COLOURS
from ovdet.options import SYNTH_DEFAULT_SHAPES as DEFAULT_SHAPES
from ovdet.options import SYNTH_PALETTE as PALETTE
from ovdet.options import SYNTH_SHAPES as SHAPES
from ovdet.util.progress import progress as progress_display

SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class WorldSpec:
    """What the generated world looks like: vocabulary, image size, objects per image, object sizes, overlap."""

    colours: Sequence[str] = DEFAULT_COLOURS
    shapes: Sequence[str] = DEFAULT_SHAPES
    imgsz: int = 160
    objects: tuple[int, int] = (2, 6)  # objects per image, inclusive range
    size: tuple[float, float] = (0.09, 0.32)  # object side as a fraction of the image side
    max_overlap: float = 0.1  # at most this fraction of the smaller of two boxes may be shared
    clutter: tuple[int, int] = (4, 12)  # background lines and blobs per image
    clutter_colours: Sequence[str] = field(default=())  # default: palette colours not in the vocabulary, plus greys
    # A large canvas (width, height) instead of imgsz×imgsz images: clutter and noise look locally like an
    # imgsz image, `objects` is per canvas and `object_px` (side in pixels) replaces `size`.
    canvas: tuple[int, int] | None = None
    object_px: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in (*self.colours, *self.clutter_colours) if c not in PALETTE]
        if unknown:
            raise DatasetError(f"Unknown colour(s) {unknown}: choose from {sorted(PALETTE)}.")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise DatasetError(f"Unknown shape(s) {bad}: choose from {list(SHAPES)}.")
        if not self.colours or not self.shapes:
            raise DatasetError("The vocabulary needs at least one colour and one shape.")
        if len(set(self.colours)) != len(self.colours) or len(set(self.shapes)) != len(self.shapes):
            raise DatasetError("Colours and shapes must not repeat.")
        if self.imgsz < 32:
            raise DatasetError(f"Image size {self.imgsz} is too small: use at least 32 pixels.")
        if not (1 <= self.objects[0] <= self.objects[1]):
            raise DatasetError(f"Objects per image {self.objects} must be a range like (2, 6) with 1 <= min <= max.")
        if not (0 < self.size[0] <= self.size[1] < 1):
            raise DatasetError(f"Object size range {self.size} must be fractions with 0 < min <= max < 1.")
        if self.canvas is not None and (len(self.canvas) != 2 or min(self.canvas) < 32):
            raise DatasetError(f"Canvas {self.canvas} must be (width, height) with both at least 32 pixels.")
        if self.object_px is not None:
            longest = min(self.canvas) if self.canvas is not None else self.imgsz
            if len(self.object_px) != 2 or not (4 <= self.object_px[0] <= self.object_px[1] < longest):
                raise DatasetError(f"Object size {self.object_px} must be MIN,MAX pixels with 4 <= MIN <= MAX < "
                                   f"{longest} (the shorter image side).")

    @property
    def shape(self) -> tuple[int, int]:
        """(width, height) of every image."""
        return tuple(self.canvas) if self.canvas is not None else (self.imgsz, self.imgsz)

    @property
    def names(self) -> list[str]:
        """Class names, colour-major: "red circle", "red square", ..., "blue triangle"."""
        return [f"{c} {s}" for c in self.colours for s in self.shapes]

    @property
    def distractor_colours(self) -> list[tuple[int, int, int]]:
        """Colours the clutter is drawn in: never one of the vocabulary's colours."""
        names = self.clutter_colours or [c for c in PALETTE if c not in self.colours]
        return [PALETTE[c] for c in names] + [(90, 90, 90), (160, 160, 160), (225, 225, 225), (40, 40, 40)]


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _shape_polygon(rng: np.random.Generator, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Vertices (float, Nx2) of a square, triangle or star of circumradius-ish `r`, randomly rotated."""
    if shape == "square":
        angle = np.deg2rad(rng.uniform(-12, 12))
        base = np.deg2rad(np.array([45, 135, 225, 315]))
        radius = np.full(4, r * np.sqrt(2))
    elif shape == "triangle":
        angle = rng.uniform(0, 2 * np.pi)
        base = np.deg2rad(np.array([90, 210, 330]))
        radius = np.full(3, r * 1.15)
    else:  # star
        angle = rng.uniform(0, 2 * np.pi)
        base = np.deg2rad(np.arange(10) * 36.0)
        radius = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
    theta = base + angle
    return np.stack([cx + radius * np.cos(theta), cy - radius * np.sin(theta)], axis=1)


def _place_shape(rng: np.random.Generator, shape: str, cx: float, cy: float,
                 r: float) -> tuple[tuple, np.ndarray]:
    """A shape of radius r at (cx, cy): what to draw (a circle's centre and radius, or a polygon) and its box, the
    pixel edges of what is filled."""
    if shape == "circle":
        centre, radius = (int(round(cx)), int(round(cy))), int(round(r))
        box = np.array([centre[0] - radius, centre[1] - radius, centre[0] + radius + 1, centre[1] + radius + 1])
        return ("circle", centre, radius), box
    pts = np.round(_shape_polygon(rng, shape, cx, cy, r)).astype(np.int32)
    return ("polygon", pts), np.concatenate([pts.min(0), pts.max(0) + 1])


def _draw_shape(img: np.ndarray, shape: tuple, colour: tuple[int, int, int]) -> None:
    """Fill a shape placed by _place_shape, anti-aliased."""
    if shape[0] == "circle":
        cv2.circle(img, shape[1], shape[2], colour, -1, cv2.LINE_AA)
    else:
        cv2.fillPoly(img, [shape[1]], colour, cv2.LINE_AA)


def _overlap(box: np.ndarray, boxes: list[np.ndarray]) -> float:
    """Largest fraction of the smaller box that `box` shares with any of `boxes`."""
    worst = 0.0
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            worst = max(worst, iw * ih / smaller)
    return worst


def background(rng: np.random.Generator, spec: WorldSpec) -> np.ndarray:
    """A backdrop without objects: low-saturation gradient, lines and blobs in distractor colours (no noise)."""
    s = spec.imgsz
    base = rng.integers(60, 200)
    tint = rng.integers(-25, 26, size=3)
    img = np.clip(np.full((s, s, 3), base, np.int16) + tint, 0, 255).astype(np.uint8)
    ramp = np.linspace(-1, 1, s, dtype=np.float32)
    gradient = rng.uniform(-30, 30) * (ramp[None, :] if rng.random() < 0.5 else ramp[:, None])
    img = np.clip(img.astype(np.float32) + gradient[..., None], 0, 255).astype(np.uint8)
    colours = spec.distractor_colours
    for _ in range(int(rng.integers(spec.clutter[0], spec.clutter[1] + 1))):
        colour = _jitter(rng, colours[int(rng.integers(len(colours)))], 20)
        if rng.random() < 0.5:
            p1, p2 = rng.integers(0, s, size=(2, 2))
            cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), colour,
                     int(rng.integers(1, max(2, s // 40) + 1)), cv2.LINE_AA)
        else:  # an irregular blob: a jagged polygon around a random centre
            centre = rng.uniform(0, s, size=2)
            n = int(rng.integers(5, 9))
            theta = np.sort(rng.uniform(0, 2 * np.pi, size=n))
            rad = rng.uniform(0.02, 0.12, size=n) * s
            pts = np.stack([centre[0] + rad * np.cos(theta), centre[1] + rad * np.sin(theta)], axis=1)
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
    return img


def instance_masks(shapes: list[tuple], boxes: np.ndarray) -> list[MaskPart]:
    """The exact mask of each drawn shape (filled without anti-aliasing, within its box), minus the pixels of the
    shapes drawn after it, as crops (large canvases stay cheap)."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    crops = []
    for shape, (x0, y0, x1, y1) in zip(shapes, boxes):
        crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
        if shape[0] == "circle":
            cv2.circle(crop, (shape[1][0] - x0, shape[1][1] - y0), shape[2], 1, -1)
        else:
            cv2.fillPoly(crop, [shape[1] - (x0, y0)], 1)
        crops.append(crop.astype(bool))
    for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            bx0, by0, bx1, by1 = boxes[j]
            x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
            if x0 < x1 and y0 < y1:
                crops[i][y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0] &= ~crops[j][y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return [MaskPart(int(x0), int(y0), crop) for (x0, y0, _, _), crop in zip(boxes, crops)]


def render(rng: np.random.Generator, spec: WorldSpec, masks: bool = False) -> tuple:
    """One image: BGR uint8 (H×W×3), boxes (N×4 pixel xyxy, float32) and class ids (N, int) into `spec.names`;
    with `masks`, a fourth item: each object's instance mask (instance_masks). The image is the same either way."""
    if spec.canvas is not None:
        return render_canvas(rng, spec, masks)
    s = spec.imgsz
    if spec.object_px is not None:
        spec = dataclasses.replace(spec, size=(spec.object_px[0] / s, spec.object_px[1] / s))
    img = background(rng, spec)
    boxes: list[np.ndarray] = []
    class_ids: list[int] = []
    shapes: list[tuple] = []
    wanted = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    for _ in range(wanted * 20):  # rejection sampling for limited overlap; give up on crowded images
        if len(boxes) == wanted:
            break
        r = rng.uniform(*spec.size) * s / 2
        cx, cy = rng.uniform(0, s, size=2)
        ci, si = int(rng.integers(len(spec.colours))), int(rng.integers(len(spec.shapes)))
        shape, box = _place_shape(rng, spec.shapes[si], cx, cy, r)
        if box[0] < 0 or box[1] < 0 or box[2] > s or box[3] > s or _overlap(box, boxes) > spec.max_overlap:
            continue
        colour = _jitter(rng, PALETTE[spec.colours[ci]], 15)
        _draw_shape(img, shape, colour)
        boxes.append(box)
        class_ids.append(ci * len(spec.shapes) + si)
        shapes.append(shape)
    noise = rng.normal(0, rng.uniform(3, 12), size=img.shape)
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    out = img, np.array(boxes, np.float32).reshape(-1, 4), np.array(class_ids, int)
    return (*out, instance_masks(shapes, np.array(boxes).reshape(-1, 4))) if masks else out


def render_canvas(rng: np.random.Generator, spec: WorldSpec, masks: bool = False) -> tuple:
    """A large image (spec.canvas) of small objects: like render, but clutter is local (lines and blobs the size
    they have in an imgsz image, as many per imgsz² of area) and objects are `object_px` pixels across."""
    width, height = spec.canvas
    s = spec.imgsz
    per_area = width * height / (s * s)
    base = rng.integers(60, 200)
    tint = rng.integers(-25, 26, size=3)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = np.clip(int(base) + tint, 0, 255).astype(np.uint8)
    horizontal = rng.random() < 0.5
    amount = rng.uniform(-30, 30)
    ramp = np.linspace(-amount, amount, width if horizontal else height, dtype=np.float32)
    for y in range(0, height, 512):  # the gradient, in bands of rows (a float copy of a large canvas is big)
        band = img[y:y + 512].astype(np.float32)
        band += ramp[None, :, None] if horizontal else ramp[y:y + 512, None, None]
        img[y:y + 512] = np.clip(band, 0, 255)
    colours = spec.distractor_colours
    for _ in range(int(rng.integers(round(spec.clutter[0] * per_area), round(spec.clutter[1] * per_area) + 1))):
        colour = _jitter(rng, colours[int(rng.integers(len(colours)))], 20)
        centre = rng.uniform((0, 0), (width, height))
        if rng.random() < 0.5:
            p1, p2 = (np.round(centre + rng.uniform(-s / 2, s / 2, size=2)).astype(int) for _ in range(2))
            cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), colour,
                     int(rng.integers(1, max(2, s // 40) + 1)), cv2.LINE_AA)
        else:
            n = int(rng.integers(5, 9))
            theta = np.sort(rng.uniform(0, 2 * np.pi, size=n))
            rad = rng.uniform(0.02, 0.12, size=n) * s
            pts = np.stack([centre[0] + rad * np.cos(theta), centre[1] + rad * np.sin(theta)], axis=1)
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
    lo, hi = spec.object_px if spec.object_px is not None else (spec.size[0] * s, spec.size[1] * s)
    boxes = np.zeros((0, 4), np.int64)
    class_ids: list[int] = []
    shapes: list[tuple] = []
    wanted = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    for _ in range(wanted * 20):
        if len(boxes) == wanted:
            break
        r = rng.uniform(lo, hi) / 2
        cx, cy = rng.uniform((0, 0), (width, height))
        ci, si = int(rng.integers(len(spec.colours))), int(rng.integers(len(spec.shapes)))
        shape, box = _place_shape(rng, spec.shapes[si], cx, cy, r)
        if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
            continue
        if len(boxes):
            iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
            ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            smaller = np.minimum(areas, (box[2] - box[0]) * (box[3] - box[1]))
            if (np.clip(iw, 0, None) * np.clip(ih, 0, None) / smaller).max() > spec.max_overlap:
                continue
        colour = _jitter(rng, PALETTE[spec.colours[ci]], 15)
        _draw_shape(img, shape, colour)
        boxes = np.concatenate([boxes, box[None]])
        class_ids.append(ci * len(spec.shapes) + si)
        shapes.append(shape)
    sigma = rng.uniform(3, 12)
    for y in range(0, height, 512):  # noise in bands of rows
        band = img[y:y + 512]
        noise = rng.standard_normal(band.shape, dtype=np.float32) * sigma
        img[y:y + 512] = np.clip(band.astype(np.float32) + noise, 0, 255)
    out = img, boxes.astype(np.float32).reshape(-1, 4), np.array(class_ids, int)
    return (*out, instance_masks(shapes, boxes)) if masks else out


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index), so splits do not shift each other."""
    return np.random.default_rng([seed, SPLITS[split], index])


def generate(out: str | Path, train: int = 512, val: int = 128, seed: int = 0,
             spec: WorldSpec | None = None, progress: bool = True, masks: bool = False) -> Path:
    """Write a YOLO dataset (images/{train,val}, labels/{train,val}, data.yaml) under `out`; returns data.yaml.
    With `masks` the labels are segment lines: each object's exact mask outlined along pixel edges
    (ovdet.masks.rle.mask_polygon: the outline spans the object's box and redraws the mask exactly, holes filled),
    and data.yaml says `masks: true`."""
    spec = spec or WorldSpec()
    out = Path(out)
    if train < 1 or val < 0:
        raise DatasetError(f"Need at least one training image and a non-negative val count, got {train}/{val}.")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder: choose another output path.")
    if out.is_dir() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty: choose a new folder or delete it first.")
    width, height = spec.shape
    for split, count in (("train", train), ("val", val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        with progress_display(total=count, desc=f"synth {split}", unit="img", quiet=not progress) as bar:
            for i in range(count):
                img, boxes, class_ids, *parts = render(image_rng(seed, split, i), spec, masks=masks)
                if not cv2.imwrite(str(out / "images" / split / f"{i:06d}.png"), img):
                    raise DatasetError(f"Could not write images to {out}: check the folder is writable.")
                if masks:
                    text = "".join(yolo_segment(c, mask_polygon(p.mask) + (p.x, p.y), b, width, height)
                                   for c, b, p in zip(class_ids, boxes.tolist(), parts[0]))
                else:
                    xywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
                    text = "".join(f"{c} " + " ".join(f"{v / d:.6f}" for v, d in zip(b, (width, height, width,
                                                                                           height))) + "\n"
                                   for c, b in zip(class_ids, xywh))
                (out / "labels" / split / f"{i:06d}.txt").write_text(text)
                bar.update(1)
    data = {
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(spec.names)),
        "synth": {"seed": seed, "train": train, "val": val, "imgsz": spec.imgsz,
                  "colours": list(spec.colours), "shapes": list(spec.shapes),
                  **({"canvas": list(spec.canvas)} if spec.canvas is not None else {}),
                  **({"object_size": list(spec.object_px)} if spec.object_px is not None else {}),
                  **({"masks": True} if masks else {})},
    }
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
