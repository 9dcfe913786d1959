"""ovdet.media.sources: load_image on every kind of input, strict errors, folder walks, threaded prefetch."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import deny_reading
from ovdet.media import sources
from ovdet.errors import DatasetError, ImageReadError, InvalidImageError
from ovdet.media.sources import iter_image_files, list_image_files, load_image, prefetch_images


def pattern(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth BGR uint8 test image (compresses well, survives JPEG with small error)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def check_bgr(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8
    assert img.shape == (*shape, 3)
    assert img.flags.c_contiguous


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"])
def test_reads_every_supported_extension(tmp_path, ext):
    img = pattern()
    path = tmp_path / f"a{ext}"
    assert cv2.imwrite(str(path), img)
    out = load_image(path)
    check_bgr(out, (48, 64))
    lossy = ext in (".jpg", ".jpeg", ".webp")
    assert np.abs(out.astype(int) - img.astype(int)).mean() < (4 if lossy else 1e-9)
    assert np.array_equal(load_image(str(path)), out)  # str and Path alike


def test_jpeg_matches_opencv_decode(tmp_path):
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), pattern(120, 160))
    assert np.array_equal(load_image(path), cv2.imread(str(path)))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    rgb = cv2.cvtColor(pattern(40, 80), cv2.COLOR_BGR2RGB)
    pil = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    pil.save(path, quality=95, exif=exif.tobytes())
    out = load_image(path)
    expected_shape = (40, 80) if orientation == 3 else (80, 40)
    check_bgr(out, expected_shape)
    ref = cv2.cvtColor(np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")), cv2.COLOR_RGB2BGR)
    assert np.array_equal(out, ref)


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = pattern()[:, :, 0]
    path = tmp_path / "g.png"
    cv2.imwrite(str(path), gray)
    out = load_image(path)
    check_bgr(out, (48, 64))
    for c in range(3):
        assert np.array_equal(out[:, :, c], gray)


def test_rgba_png_drops_alpha(tmp_path):
    bgr = pattern()
    alpha = np.full(bgr.shape[:2], 7, np.uint8)
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.dstack([bgr, alpha]))
    assert np.array_equal(load_image(path), bgr)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png(tmp_path, transparency):
    rgb = cv2.cvtColor(pattern(), cv2.COLOR_BGR2RGB)
    pal = Image.fromarray(rgb).quantize(16)
    path = tmp_path / "p.png"
    if transparency:
        pal.save(path, transparency=0)
    else:
        pal.save(path)
    assert Image.open(path).mode == "P"
    out = load_image(path)
    check_bgr(out, (48, 64))
    ref = cv2.cvtColor(np.asarray(pal.convert("RGB")), cv2.COLOR_RGB2BGR)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_images_are_scaled_to_8bit(tmp_path, ext, channels):
    rng = np.random.default_rng(1)
    a16 = rng.integers(0, 65536, (30, 40, channels), dtype=np.uint16)
    if channels == 1:
        a16 = a16[:, :, 0]
    path = tmp_path / f"d{ext}"
    assert cv2.imwrite(str(path), a16)
    out = load_image(path)
    check_bgr(out, (30, 40))
    expected = (a16 >> 8).astype(np.uint8)
    if channels == 1:
        expected = np.dstack([expected] * 3)
    assert np.array_equal(out, expected)


def test_cmyk_jpeg(tmp_path):
    rgb = cv2.cvtColor(pattern(), cv2.COLOR_BGR2RGB)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    check_bgr(out, (48, 64))
    assert np.abs(out.astype(int) - pattern().astype(int)).mean() < 6


def test_truncated_jpeg_is_an_error_not_a_grey_image(tmp_path):
    path = tmp_path / "trunc.jpg"
    cv2.imwrite(str(path), cv2.resize(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), (256, 256)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_png_is_an_error(tmp_path):
    path = tmp_path / "trunc.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc"):
        load_image(path)


def test_jpeg_with_trailing_bytes_after_end_marker_still_loads(tmp_path):
    path = tmp_path / "motion.jpg"
    cv2.imwrite(str(path), pattern())
    path.write_bytes(path.read_bytes() + b"ftypmp42" + bytes(200))  # e.g. a motion photo's appended video
    check_bgr(load_image(path), (48, 64))


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"this is not an image\n", "not a recognised image"),
        ("garbage.png", bytes(range(256)) * 4, "not a recognised image"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9", "corrupt|trunc"),
    ],
)
def test_bad_files_raise_image_read_error_naming_path_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="directory"):
        load_image(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path, other = tmp_path / "secret.jpg", tmp_path / "public.jpg"
    cv2.imwrite(str(path), pattern())
    cv2.imwrite(str(other), pattern())
    deny_reading(path, monkeypatch)
    with pytest.raises(ImageReadError, match="permission denied; make the file readable") as info:
        load_image(path)
    assert str(path) in str(info.value)
    check_bgr(load_image(other), (48, 64))  # only that file
    loaded = list(prefetch_images([path, other]))  # the background reader records it and goes on
    assert [item.error is not None for item in loaded] == [True, False]
    assert "permission denied" in str(loaded[0].error)


def test_non_image_is_rejected_even_after_ultralytics_patched_pil(tmp_path):
    import ultralytics.utils.patches  # noqa: F401  (replaces PIL.Image.open with a pip-installing wrapper)

    path = tmp_path / "fake.jpg"
    path.write_text("hello")
    with pytest.raises(ImageReadError, match="not a recognised image"):
        load_image(path)


# ------------------------------------------------------------------ in-memory inputs


def test_bgr_uint8_array_is_returned_without_copy():
    img = pattern()
    assert load_image(img) is img


def test_array_conversions():
    bgr = pattern()
    gray = bgr[:, :, 0].copy()
    assert np.array_equal(load_image(gray), np.dstack([gray] * 3))
    assert np.array_equal(load_image(gray[:, :, None]), np.dstack([gray] * 3))
    assert np.array_equal(load_image(np.dstack([bgr, np.zeros_like(gray)])), bgr)
    assert np.array_equal(load_image(bgr.astype(np.uint16) * 257), bgr)
    view = bgr[:, ::2]
    out = load_image(view)
    assert out.flags.c_contiguous and np.array_equal(out, view)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((8, 8, 3), np.float32), "dtype float32; expected uint8"),
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\); expected HxWx3"),
        (np.zeros((2, 8, 8, 3), np.uint8), "expected HxWx3"),
        (np.zeros((0, 8, 3), np.uint8), "must be > 0"),
    ],
)
def test_bad_arrays_raise_invalid_image_error(arr, match):
    with pytest.raises(InvalidImageError, match=match):
        load_image(arr)


@pytest.mark.parametrize("obj", [42, None, [1, 2, 3], b"bytes"])
def test_wrong_type(obj):
    with pytest.raises(InvalidImageError, match="expected a file path"):
        load_image(obj)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "LA", "1"])
def test_pil_images_of_every_mode(mode):
    rgb = cv2.cvtColor(pattern(), cv2.COLOR_BGR2RGB)
    pil = Image.fromarray(rgb).convert(mode)
    out = load_image(pil)
    check_bgr(out, (48, 64))
    ref = cv2.cvtColor(np.asarray(pil.convert("RGB")), cv2.COLOR_RGB2BGR)
    assert np.array_equal(out, ref)


def test_pil_16bit_image():
    a16 = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    pil = Image.fromarray(a16)
    assert pil.mode.startswith("I;16")
    assert np.array_equal(load_image(pil), np.dstack([(a16 >> 8).astype(np.uint8)] * 3))


def test_pil_image_keeps_its_stored_orientation(tmp_path):
    """A PIL image is taken as given: boxes must refer to the object the caller holds."""
    pil = Image.fromarray(cv2.cvtColor(pattern(40, 80), cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    pil.save(path, exif=exif.tobytes())
    check_bgr(load_image(Image.open(path)), (40, 80))


def test_lazy_truncated_pil_image_is_an_error(tmp_path):
    path = tmp_path / "t.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))
    data = path.read_bytes()
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        load_image(lazy)


# ------------------------------------------------------------------ folder walks


def make_tree(root: Path) -> None:
    for rel in ["b.jpg", "a.PNG", "c.JPEG", "z.bmp", "w.webp", "t.TIF", "u.tiff", "notes.txt", "anim.gif",
                ".hidden.jpg", "sub/x.jpg", "sub/deeper/y.png", "sub2/k.jpg", ".cache/h.jpg"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_walk_is_sorted_recursive_and_filters_extensions(tmp_path):
    make_tree(tmp_path)
    rels = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert rels == ["a.PNG", "b.jpg", "c.JPEG", "sub/deeper/y.png", "sub/x.jpg", "sub2/k.jpg", "t.TIF", "u.tiff",
                    "w.webp", "z.bmp"]
    flat = [p.name for p in iter_image_files(tmp_path, recursive=False)]
    assert flat == ["a.PNG", "b.jpg", "c.JPEG", "t.TIF", "u.tiff", "w.webp", "z.bmp"]
    assert list_image_files(tmp_path) == list(iter_image_files(tmp_path))


def test_walk_survives_symlink_loops_and_keeps_broken_links(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # sub/loop -> root
    (tmp_path / "self").symlink_to(tmp_path / "self")  # a link to itself
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    (other / "o.jpg").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(other)
    rels = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert rels == ["gone.jpg", "linked/o.jpg", "sub/a.jpg"]


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list(iter_image_files(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no image files"):
        list_image_files(tmp_path)


# ------------------------------------------------------------------ prefetch


def test_prefetch_keeps_order_reports_errors_and_decodes_in_threads(tmp_path, monkeypatch):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        if i % 5 == 3:
            path.write_text("broken")
        else:
            cv2.imwrite(str(path), pattern(seed=i))
        paths.append(path)
    threads = set()
    real = sources.load_image

    def spy(x):
        threads.add(threading.current_thread().name)
        return real(x)

    monkeypatch.setattr(sources, "load_image", spy)
    items = list(prefetch_images(paths, workers=3, ahead=4))
    assert [it.index for it in items] == list(range(12))
    assert [it.source for it in items] == paths
    for i, it in enumerate(items):
        if i % 5 == 3:
            assert it.image is None and isinstance(it.error, ImageReadError)
        else:
            assert it.error is None and np.array_equal(it.image, pattern(seed=i))
    assert threads and all(name.startswith("ovdet-decode") for name in threads)


def test_prefetch_reads_ahead_a_bounded_number(tmp_path):
    img = pattern()
    pulled = 0

    def gen():
        nonlocal pulled
        for _ in range(50):
            pulled += 1
            yield img

    consumed = 0
    for _ in prefetch_images(gen(), workers=2, ahead=5):
        consumed += 1
        assert pulled - consumed <= 5
    assert consumed == 50
