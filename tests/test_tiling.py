"""Sliced (tiled) inference: tile grid, batching, merging across tiles, and small objects found by the demo model."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from ovdet.errors import TileError
from ovdet.jobs.synth import WorldSpec, image_rng, render
from ovdet.tiling import TileSpec, detect_tiled, greedy_groups, merge_detections, tile_grid
from ovdet.weights.registry import DEMO_FILE

needs_demo = pytest.mark.skipif(not DEMO_FILE.is_file(), reason=f"demo model {DEMO_FILE} is absent")
# The demo model knows 160-pixel shapes 14-51 px across: on this canvas untiled detection shrinks them 3x.
CANVAS = WorldSpec(canvas=(480, 360), object_px=(16, 30), objects=(10, 10))


# ---------------------------------------------------------------- grid

@pytest.mark.parametrize("width,height,size,overlap", [(1000, 700, 320, 0.2), (641, 640, 640, 0.25),
                                                       (100, 5000, 64, 0.5), (960, 960, 160, 0.0), (7, 3, 640, 0.2)])
def test_grid_covers_the_image_with_equal_tiles_flush_at_the_border(width, height, size, overlap):
    grid = tile_grid(width, height, size, overlap)
    assert grid.dtype == np.int64 and grid.shape[1] == 4
    widths, heights = grid[:, 2] - grid[:, 0], grid[:, 3] - grid[:, 1]
    assert (widths == min(size, width)).all() and (heights == min(size, height)).all()
    assert grid[:, :2].min() == 0 and grid[:, 2].max() == width and grid[:, 3].max() == height
    covered = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in grid:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    stride = size - int(overlap * size)
    xs = sorted(set(grid[:, 0].tolist()))
    assert xs == ([0] if width <= size else [*range(0, width - size, stride), width - size])
    assert len(grid) == len(xs) * len(set(grid[:, 1].tolist()))  # rows of the same columns


def test_grid_of_a_size_not_a_multiple_of_the_tile():
    # 1000 = 0, 256, 512 then flush 680; 700 = 0, 256 then flush 380
    grid = tile_grid(1000, 700, 320, 0.2)
    assert sorted(set(grid[:, 0].tolist())) == [0, 256, 512, 680]
    assert sorted(set(grid[:, 1].tolist())) == [0, 256, 380]
    assert grid[0].tolist() == [0, 0, 320, 320] and grid[-1].tolist() == [680, 380, 1000, 700]


def test_bad_tile_settings_raise_a_clear_error():
    with pytest.raises(TileError, match="overlap"):
        TileSpec(size=320, overlap=1.0)
    with pytest.raises(TileError, match="tile size"):
        TileSpec(size=0)
    with pytest.raises(TileError, match="nms"):
        TileSpec(merge="wbf")
    with pytest.raises(TileError, match="empty"):
        tile_grid(0, 10, 64)


# ---------------------------------------------------------------- merging

def _random_boxes(rng, n, classes=3):
    xy = rng.uniform(0, 200, size=(n, 2))
    wh = rng.uniform(5, 60, size=(n, 2))
    return (np.concatenate([xy, xy + wh], 1), rng.permutation(n).astype(np.float64) / n + 0.01,
            rng.integers(0, classes, n))


@pytest.mark.parametrize("metric", ["ios", "iou"])
def test_greedy_groups_equal_supervision(metric):
    rng = np.random.default_rng(3)
    xyxy, scores, cls = _random_boxes(rng, 300)
    predictions = np.c_[xyxy, scores, cls]
    sv_metric = sv.OverlapMetric.IOS if metric == "ios" else sv.OverlapMetric.IOU
    keep = sv.box_non_max_suppression(predictions, 0.5, overlap_metric=sv_metric)
    nms = greedy_groups(xyxy, scores, cls, 0.5, metric)
    assert sorted(int(g[0]) for g in nms) == np.flatnonzero(keep).tolist()
    nmm = greedy_groups(xyxy, scores, cls, 0.5, metric, merge=True)
    expected = sv.box_non_max_merge(predictions, 0.5, overlap_metric=sv_metric)
    assert sorted(sorted(g.tolist()) for g in nmm) == sorted(sorted(g) for g in expected)
    # the limit stops early with exactly the best groups
    assert [g.tolist() for g in greedy_groups(xyxy, scores, cls, 0.5, metric, merge=True, limit=7)] == \
        [g.tolist() for g in nmm[:7]]


def _dets(xyxy, conf, cls):
    return sv.Detections(xyxy=np.asarray(xyxy, np.float32), confidence=np.asarray(conf, np.float32),
                         class_id=np.asarray(cls), data={"class_name": np.array([f"c{c}" for c in cls])})


def test_nmm_merges_the_pieces_of_a_cut_object_into_their_union():
    # two halves of one object from two tiles, the whole object from a third tile, and another class on top
    dets = _dets([[100, 50, 140, 90], [120, 50, 160, 90], [100, 50, 160, 90], [100, 50, 160, 90]],
                 [0.6, 0.5, 0.8, 0.7], [0, 0, 0, 1])
    merged = merge_detections(dets, "nmm", 0.5, "ios")
    assert merged.class_id.tolist() == [0, 1]
    assert merged.xyxy[0].tolist() == [100, 50, 160, 90] and merged.confidence[0] == pytest.approx(0.8)
    halves = merge_detections(dets[:2], "nmm", 0.0, "ios")  # halves that only touch merge at threshold 0
    assert len(halves) == 1 and halves.xyxy[0].tolist() == [100, 50, 160, 90]
    nms = merge_detections(dets, "nms", 0.5, "ios")  # NMS keeps the best, the whole object
    assert nms.xyxy.tolist() == [[100, 50, 160, 90], [100, 50, 160, 90]] and nms.class_id.tolist() == [0, 1]
    assert merge_detections(dets, "nms", 0.5, "ios", max_det=1).confidence.tolist() == pytest.approx([0.8])


# ---------------------------------------------------------------- the tiled loop, with a fake detector

class SeesRectangles:
    """A batch detector that finds the visible part of known rectangles in each image it is given, and counts
    its calls: the tiles of an image are views into it, so the offset of a tile is recoverable from memory."""

    def __init__(self, image, objects):
        self.image, self.objects, self.calls, self.sizes = image, np.asarray(objects, float), 0, []

    def __call__(self, tiles):
        self.calls += 1
        self.sizes.append(len(tiles))
        out = []
        for tile in tiles:
            assert np.shares_memory(tile, self.image)  # a view, not a copy
            offset = tile.__array_interface__["data"][0] - self.image.__array_interface__["data"][0]
            y0, x0 = divmod(offset // 3, self.image.shape[1])
            h, w = tile.shape[:2]
            boxes = np.clip(self.objects - [x0, y0, x0, y0], 0, [w, h, w, h])
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            full = (self.objects[:, 2] - self.objects[:, 0]) * (self.objects[:, 3] - self.objects[:, 1])
            visible = area > 0
            out.append(_dets(boxes[visible], 0.3 + 0.6 * (area / full)[visible], np.zeros(int(visible.sum()), int)))
        return out


def test_tiles_go_through_in_batches_and_a_cut_object_comes_out_once():
    image = np.zeros((300, 500, 3), np.uint8)
    objects = [[150, 100, 190, 140],  # across the border of the first two tile columns (0-160, 128-288)
               [100, 20, 200, 60],  # wider than the overlap: no tile holds all of it
               [10, 10, 30, 30], [460, 250, 490, 290]]
    fake = SeesRectangles(image, objects)
    spec = TileSpec(size=160, overlap=0.2, full_image=False, merge="nmm", batch=5)
    [dets] = detect_tiled(fake, [image], spec)
    n_tiles = len(tile_grid(500, 300, 160, 0.2))
    assert fake.calls == -(-n_tiles // 5) and sum(fake.sizes) == n_tiles and max(fake.sizes) == 5
    assert sorted(dets.xyxy.tolist()) == sorted(objects)
    for merge in ("nms", "nmm"):  # any merge: one box per object
        [dets] = detect_tiled(SeesRectangles(image, objects), [image], TileSpec(size=160, merge=merge))
        assert len(dets) == 4


def test_tiles_of_several_images_share_batches_and_the_full_pass_is_batched():
    images = [np.zeros((200, 300, 3), np.uint8) for _ in range(3)]
    sizes = []

    def detect(batch):
        sizes.append([a.shape[:2] for a in batch])
        return [_dets(np.zeros((0, 4)), [], np.zeros(0, int)) for _ in batch]

    out = detect_tiled(detect, images, TileSpec(size=128, overlap=0.0, batch=8))
    per_image = len(tile_grid(300, 200, 128, 0.0))  # 3 x 2
    assert len(out) == 3 and all(len(d) == 0 and "class_name" in d.data for d in out)
    tile_calls = [s for s in sizes if s[0] == (128, 128)]
    full_calls = [s for s in sizes if s[0] == (200, 300)]
    assert [len(s) for s in tile_calls] == [8, 8, 2] and sum(map(len, tile_calls)) == 3 * per_image
    assert [len(s) for s in full_calls] == [3]  # one forward for the three full-image passes


def test_an_image_smaller_than_a_tile_is_detected_once():
    calls = []

    def detect(batch):
        calls.append(len(batch))
        return [_dets([[1, 1, 5, 5]], [0.9], [0]) for _ in batch]

    [dets] = detect_tiled(detect, [np.zeros((50, 60, 3), np.uint8)], TileSpec(size=640))
    assert calls == [1] and dets.xyxy.tolist() == [[1, 1, 5, 5]]


# ---------------------------------------------------------------- the demo model

@pytest.fixture(scope="module")
def demo():
    from ovdet import OVDetector

    det = OVDetector("demo", device="cpu")
    det.set_classes(CANVAS.names)
    return det


@pytest.fixture(scope="module")
def canvas():
    return render(image_rng(11, "val", 0), CANVAS)


def _recall(dets, boxes, class_ids):
    if len(dets) == 0:
        return 0.0
    iou = sv.box_iou_batch(boxes, dets.xyxy)
    return float(np.mean([((iou[i] >= 0.5) & (dets.class_id == c)).any() for i, c in enumerate(class_ids)]))


@needs_demo
def test_demo_model_finds_small_objects_only_when_tiled(demo, canvas):
    image, boxes, class_ids = canvas
    assert len(boxes) == 10
    assert _recall(demo.detect(image), boxes, class_ids) <= 0.2
    tiled = demo.detect(image, tile=160, overlap=0.2)
    assert _recall(tiled, boxes, class_ids) >= 0.9
    # tiles alone: one box per object, not one per tile (the full-image pass adds the shrunken view's guesses)
    only_tiles = demo.detect(image, tile=160, overlap=0.2, full_image=False)
    assert _recall(only_tiles, boxes, class_ids) >= 0.9 and len(only_tiles) <= 1.15 * len(boxes)
    assert (tiled.xyxy >= 0).all() and (tiled.xyxy[:, [2]] <= 480).all() and (tiled.xyxy[:, [3]] <= 360).all()
    assert set(tiled.data["class_name"]) <= set(CANVAS.names)
    assert _recall(demo.detect(image, tile=240, merge="nmm"), boxes, class_ids) >= 0.9  # tiles shrunk to 160


@needs_demo
def test_demo_object_on_a_tile_border_comes_out_once(demo):
    spec = WorldSpec(canvas=(288, 160), object_px=(30, 30), objects=(1, 1), clutter=(0, 0))
    image, boxes, class_ids = render(image_rng(5, "val", 1), spec)
    # move the object so that it straddles x = 160, the right edge of the first 160-px tile (stride 128)
    x0, y0, x1, y1 = boxes[0].astype(int)
    patch = image[y0:y1, x0:x1].copy()
    image[y0:y1, x0:x1] = image[0:y1 - y0, 0:x1 - x0]
    nx, ny = 160 - (x1 - x0) // 2, 60
    image[ny:ny + y1 - y0, nx:nx + x1 - x0] = patch
    truth = np.array([[nx, ny, nx + x1 - x0, ny + y1 - y0]], np.float32)
    for merge in ("nms", "nmm"):
        dets = demo.detect(image, tile=160, overlap=0.2, full_image=False, merge=merge, conf=0.3)
        assert len(dets) == 1 and sv.box_iou_batch(truth, dets.xyxy)[0, 0] >= 0.7, merge
        assert dets.class_id[0] == class_ids[0]


@needs_demo
def test_demo_tiles_run_in_batched_forwards(demo, canvas, monkeypatch):
    image = canvas[0]
    calls = []
    inner = demo.detect_batch

    def counting(images, **kw):
        images = list(images)
        if kw.get("tile") is None:
            calls.append(len(images))
        return inner(images, **kw)

    monkeypatch.setattr(demo, "detect_batch", counting)
    demo.detect(image, tile=TileSpec(size=160, overlap=0.2, batch=8))
    n_tiles = len(tile_grid(480, 360, 160, 0.2))  # 4 x 3
    assert calls == [8, 4, 1]  # two batches of tiles and one full-image pass
    assert sum(calls) == n_tiles + 1


@needs_demo
def test_demo_thresholds_and_negatives_act_per_tile_as_without_tiling(demo, canvas):
    from ovdet.text.prompts import ClassEntry, ClassSpec

    image = canvas[0]
    names = CANVAS.names
    plain = demo.detect(image, tile=160, conf=0.2)
    first = int(np.bincount(plain.class_id).argmax())  # a class with several boxes: give it its own threshold
    top = np.sort(plain.confidence[plain.class_id == first])[::-1]
    own = float(top[:2].mean())  # between its two best scores
    try:
        demo.set_classes(ClassSpec(tuple(ClassEntry(n, (n,), conf=own if i == first else None)
                                         for i, n in enumerate(names))))
        limited = demo.detect(image, tile=160, conf=0.2)
        keep = (plain.class_id != first) | (plain.confidence > own)
        assert 0 < (~keep).sum() < (plain.class_id == first).sum()
        assert np.allclose(limited.xyxy, plain.xyxy[keep], atol=1e-3)
        assert np.array_equal(limited.class_id, plain.class_id[keep])
        others = [n for i, n in enumerate(names) if i != first]
        demo.set_classes(others + ["!" + names[first]])  # that class as a negative: its boxes are dropped
        negative = demo.detect(image, tile=160, conf=0.2)
        rest = plain[plain.class_id != first]
        assert len(rest) < len(plain) and np.allclose(negative.xyxy, rest.xyxy, atol=1e-3)
        assert [others[c] for c in negative.class_id] == [names[c] for c in rest.class_id]
        # synonyms: one class scored by two phrasings; its tiles' boxes carry the class name
        second = (first + 1) % len(names)
        demo.set_classes([f"{names[first]}|{names[second]}"] + [n for i, n in enumerate(names) if i not in
                                                                  (first, second)])
        merged = demo.detect(image, tile=160, conf=0.2)
        assert names[first] in set(merged.data["class_name"]) and names[second] not in set(merged.data["class_name"])
        both = plain[np.isin(plain.class_id, [first, second])]
        assert (merged.class_id == 0).sum() >= len(both) - 1  # the boxes of both phrasings, now one class
    finally:
        demo.set_classes(names)


@needs_demo
@pytest.mark.parametrize("shape", [(1, 1, 3), (10, 100_000, 3), (100_000, 10, 3)])
def test_degenerate_images_do_not_crash(demo, shape):
    dets = demo.detect(np.full(shape, 127, np.uint8), tile=TileSpec(size=640, batch=64))
    assert len(dets) == 0 or ((dets.xyxy[:, 2] <= shape[1]) & (dets.xyxy[:, 3] <= shape[0])).all()


@needs_demo
def test_stream_passes_tiling_on(demo, canvas):
    image = canvas[0]
    frames = list(demo.stream([image, image[::-1].copy()], tile=160, batch=2))
    assert len(frames) == 2
    expected = demo.detect(image, tile=160)  # tiles of both frames shared batches: equal up to batch numerics
    assert_same_detections_in_any_order(frames[0][1], expected)


def assert_same_detections_in_any_order(got: sv.Detections, want: sv.Detections) -> None:
    """The same boxes within the stated cross-batch tolerances (boxes 1e-2 px, scores 1e-4); near-tied scores may
    come out in another order, so each box is matched to its counterpart, not compared by position."""
    assert len(got) == len(want) > 0
    unmatched = list(range(len(got)))
    for box, score, cls in zip(want.xyxy, want.confidence, want.class_id):
        close = [i for i in unmatched if got.class_id[i] == cls and np.abs(got.xyxy[i] - box).max() <= 1e-2
                 and abs(float(got.confidence[i]) - float(score)) <= 1e-4]
        assert close, f"no detection of class {cls} at {box.tolist()} with score {score:.5f} in {got}"
        unmatched.remove(close[0])


# ---------------------------------------------------------------- commands

@pytest.fixture(scope="module")
def canvas_world(tmp_path_factory):
    from ovdet.cli import main

    out = tmp_path_factory.mktemp("canvas") / "world"
    assert main(["synth", str(out), "--train", "1", "--val", "2", "--canvas", "480x320", "--object-size", "18,30",
                 "--min-objects", "6", "--max-objects", "6", "--seed", "3", "--quiet"]) == 0
    return out


def test_synth_canvas_writes_large_images_of_small_objects(canvas_world):
    import cv2
    import yaml

    data = yaml.safe_load((canvas_world / "data.yaml").read_text())
    assert data["synth"]["canvas"] == [480, 320] and data["synth"]["object_size"] == [18, 30]
    image = cv2.imread(str(canvas_world / "images" / "val" / "000000.png"))
    assert image.shape == (320, 480, 3)
    rows = np.loadtxt(canvas_world / "labels" / "val" / "000000.txt", ndmin=2)
    assert len(rows) == 6
    w, h = rows[:, 3] * 480, rows[:, 4] * 320  # object sides back in pixels
    assert (np.maximum(w, h) >= 17).all() and (np.maximum(w, h) <= 36).all()


@needs_demo
def test_eval_and_annotate_commands_tile(canvas_world, demo, tmp_path, capsys):
    import json

    from ovdet.cli import main
    from ovdet.jobs.evaluate import evaluate, load_dataset

    untiled = evaluate(demo, load_dataset(canvas_world), progress=False).map50
    assert main(["eval", str(canvas_world), "--model", "demo", "--device", "cpu", "--json", "--quiet",
                 "--tile", "160"]) == 0
    tiled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["map50"]
    assert tiled >= 0.9 and tiled > untiled + 0.3, (tiled, untiled)

    src, out = canvas_world / "images" / "val", tmp_path / "out"
    args = ["annotate", str(src), "--classes", "red circle,green square,blue triangle", "--out", str(out),
            "--model", "demo", "--device", "cpu", "--format", "yolo", "--quiet", "--tile", "160", "--merge", "nmm"]
    assert main(args) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["tile"] == {"size": 160, "overlap": 0.2, "full_image": True, "merge": "nmm",
                                "match_threshold": 0.5, "match_metric": "ios"}
    assert len(list((out / "yolo" / "labels").rglob("*.txt"))) == 2
    assert main([*args, "--tile-overlap", "0.3"]) == 2  # other tile settings: refused like any other setting
    assert "tile" in capsys.readouterr().err

    image = str(src / "000000.png")
    assert main(["detect", image, "--classes", "red circle", "--model", "demo", "--device", "cpu", "--json",
                 "--tile", "160", "--no-full-image"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["image"] == image


# ---------------------------------------------------------------- large files, read in strips

@pytest.mark.parametrize("kind", ["png", "tif", "png16-gray", "png-rgba"])
def test_large_files_are_read_in_strips_with_the_same_pixels(tmp_path, kind):
    import cv2

    from ovdet.media.sources import load_image
    from ovdet.tiling.reader import VipsTiles, tile_source

    import pyvips  # noqa: F401  (the test extra installs it: a broken install fails here, never skips)
    image = np.random.default_rng(1).integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    path = tmp_path / f"big.{kind.split('-')[0][:3]}"
    if kind == "png16-gray":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    elif kind == "png-rgba":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    assert cv2.imwrite(str(path), image)
    reference = load_image(path)
    assert isinstance(tile_source(path), type(tile_source(reference)))  # small files are decoded whole
    source = tile_source(path, overview_size=160, stream_pixels=0)
    assert isinstance(source, VipsTiles)
    grid = tile_grid(1000, 700, 320, 0.2)
    for tile, (x0, y0, x1, y1) in zip(source.tiles(grid), grid):
        assert np.array_equal(tile, reference[y0:y1, x0:x1])
    assert source.rows_read == 700 and source.peak_band_rows == 320  # one row of tiles in memory, not the image
    overview, scale = source.overview()
    assert overview.shape == (112, 160, 3) and scale == (6.25, 6.25)
    shrunk = cv2.resize(reference, (160, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(overview.astype(int) - shrunk).mean() < 6  # shrunk strip by strip: close to a whole shrink


def test_detections_from_a_strip_read_file_equal_those_from_its_pixels(tmp_path):
    import cv2

    from ovdet.tiling.reader import tile_source

    import pyvips  # noqa: F401  (the test extra installs it: a broken install fails here, never skips)
    image = np.zeros((500, 700, 3), np.uint8)
    objects = [[150, 100, 190, 140], [600, 420, 650, 470], [300, 10, 330, 40]]
    for x0, y0, x1, y1 in objects:
        image[y0:y1, x0:x1] = 255
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), image)

    def bright_boxes(tiles):  # a "detector" that boxes the white squares it sees in each tile, surer of bigger parts
        out = []
        for tile in tiles:
            n, _, stats, _ = cv2.connectedComponentsWithStats((tile[..., 0] > 127).astype(np.uint8))
            boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:n]]
            out.append(_dets(np.reshape(boxes, (-1, 4)), [0.5 + a / 1e4 for *_, a in stats[1:n]], [0] * len(boxes)))
        return out

    spec = TileSpec(size=160, merge="nmm", batch=4, full_image=False)
    [streamed] = detect_tiled(bright_boxes, [tile_source(path, overview_size=160, stream_pixels=0)], spec)
    [decoded] = detect_tiled(bright_boxes, [image], spec)
    assert sorted(streamed.xyxy.tolist()) == sorted(decoded.xyxy.tolist()) == sorted(objects)
    # the full-image pass sees the overview shrunk from the strips; its boxes come back in full-size pixels
    full = bright_boxes([tile_source(path, overview_size=160, stream_pixels=0).overview()[0]])[0]
    [with_full] = detect_tiled(bright_boxes, [tile_source(path, overview_size=160, stream_pixels=0)],
                               TileSpec(size=160, merge="nms", batch=4))
    assert len(full) == 3 and len(with_full) == 3
    assert sv.box_iou_batch(np.array(objects, float), full.xyxy * 700 / 160).max(1).min() > 0.7
