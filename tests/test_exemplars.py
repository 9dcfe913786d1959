"""Exemplars as data: validation errors that name the class, `name=img@box` parsing, content keys, fusion maths,
and how exemplars enter a ClassSpec (Python lists, class files, negatives, records)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovdet
from conftest import deny_reading
from ovdet.errors import ClassSpecError, ImageReadError, InvalidImageError
from ovdet.text.exemplars import DEFAULT_FUSE, Exemplar, fuse, mean_embedding, parse_exemplar
from ovdet.text.prompts import parse_classes


def _image(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "ref.png"
    cv2.imwrite(str(path), _image())
    return path


def test_exported_lazily_from_ovdet():
    assert ovdet.Exemplar is Exemplar


@pytest.mark.parametrize("box, words", [
    ((10, 10, 10, 30), "zero area"), ((10, 30, 40, 20), "zero area"), ((-1, 0, 20, 20), "outside the image"),
    ((0, 0, 81, 20), "outside the 80x60 image"), ((0, 0, 20, 61), "outside the 80x60 image"),
    ((1, 2, 3), "four"), (("a", 1, 2, 3), "four"), ((0, 0, float("nan"), 5), "finite")])
def test_bad_boxes_name_the_class(box, words):
    with pytest.raises(ClassSpecError, match=words) as info:
        Exemplar(_image(), box=box, name="pallet jack")
    assert "pallet jack" in str(info.value)


def test_box_outside_a_file_image_is_refused_when_its_pixels_are_read(ref):
    ex = Exemplar(ref, box=(0, 0, 100, 20), name="forklift")  # the file is not decoded when it is made
    with pytest.raises(ClassSpecError, match="forklift.*outside the 80x60 image"):
        ex.pixels()


def test_unreadable_images_name_the_class(tmp_path, monkeypatch):
    with pytest.raises(ImageReadError, match="'forklift'.*does not exist"):
        Exemplar(tmp_path / "missing.jpg", name="forklift")
    with pytest.raises(ImageReadError, match="'forklift'.*not a regular file"):
        Exemplar(tmp_path, name="forklift")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="'forklift'.*not a recognised image"):
        Exemplar(junk, name="forklift").pixels()
    locked = tmp_path / "locked.png"
    cv2.imwrite(str(locked), _image())
    deny_reading(locked, monkeypatch)
    with pytest.raises(ImageReadError, match="'forklift'.*(permission denied|cannot be read)"):
        Exemplar(locked, name="forklift").pixels()
    with pytest.raises(InvalidImageError, match="'forklift'"):
        Exemplar(np.zeros((4, 4, 3), np.float32), name="forklift")


def test_oversized_file_is_refused(ref, monkeypatch):
    monkeypatch.setenv("OVDET_MAX_EXEMPLAR_BYTES", "100")
    with pytest.raises(ImageReadError, match="more than the cap of 100.*OVDET_MAX_EXEMPLAR_BYTES"):
        Exemplar(ref, name="forklift")


def test_name_source_and_weight_are_checked():
    with pytest.raises(ClassSpecError, match="needs the name"):
        Exemplar(_image())
    assert Exemplar(_image(), negative=True).name is None  # negatives may be unnamed
    with pytest.raises(ClassSpecError, match="blank"):
        Exemplar(_image(), name="  ")
    with pytest.raises(ClassSpecError, match="control character"):
        Exemplar(_image(), name="bad\x1bname")
    with pytest.raises(ClassSpecError, match="source 'owl'"):
        Exemplar(_image(), name="a", source="owl")
    with pytest.raises(ClassSpecError, match="weight"):
        Exemplar(_image(), name="a", weight=0)


def test_whole_image_when_no_box(ref):
    ex = Exemplar(ref, name="a")
    assert ex.xyxy() == (0.0, 0.0, 80.0, 60.0)
    assert ex.crop().shape == (60, 80, 3)
    assert Exemplar(ref, box=(10, 5, 30.5, 25), name="a").crop().shape == (20, 21, 3)


def test_key_follows_content_box_and_source_not_the_name_of_the_file(ref, tmp_path):
    base = Exemplar(ref, box=(1, 2, 30, 40), name="a")
    copy = tmp_path / "copy.png"
    copy.write_bytes(ref.read_bytes())
    assert Exemplar(copy, box=(1, 2, 30, 40), name="a").key == base.key
    assert Exemplar(ref, box=(1, 2, 30, 41), name="a").key != base.key
    assert Exemplar(ref, name="a").key != base.key
    assert Exemplar(ref, box=(1, 2, 30, 40), name="a", source="clip").key != base.key
    assert Exemplar(ref, box=(1, 2, 30, 40), name="a", source="region").key == base.key  # auto means region
    other = tmp_path / "other.png"
    cv2.imwrite(str(other), _image(seed=1))
    assert Exemplar(other, box=(1, 2, 30, 40), name="a").key != base.key
    assert base.sha256 == __import__("hashlib").sha256(ref.read_bytes()).hexdigest()


def test_array_is_copied_so_later_edits_do_not_change_it():
    img = _image()
    ex = Exemplar(img, box=(0, 0, 10, 10), name="a")
    key = ex.key
    img[:] = 0
    assert ex.key == key and ex.pixels().any()
    assert Exemplar(img, box=(0, 0, 10, 10), name="a").key != key


def test_pil_and_array_inputs():
    rgb = _image()[:, :, ::-1]
    from_pil = Exemplar(Image.fromarray(np.ascontiguousarray(rgb)), name="a")
    assert np.array_equal(from_pil.pixels(), _image())
    assert from_pil.key == Exemplar(_image(), name="a").key


@pytest.mark.parametrize("text, name, negative, box, file", [
    ("pallet jack=ref.png@1,2,30,40", "pallet jack", False, (1, 2, 30, 40), "ref.png"),
    ("pallet jack=ref.png", "pallet jack", False, None, "ref.png"),
    ("!glare=ref.png@ 1, 2, 30 ,40", "glare", True, (1, 2, 30, 40), "ref.png"),
    ("!=ref.png@0,0,5,5", None, True, (0, 0, 5, 5), "ref.png"),
    ("a=b=c@x.png", "a", False, None, "b=c@x.png"),
    ("a=me@home.png@1,1,4,4", "a", False, (1, 1, 4, 4), "me@home.png"),
])
def test_parse_exemplar(tmp_path, text, name, negative, box, file):
    cv2.imwrite(str(tmp_path / file), _image())
    ex = parse_exemplar(text, base=tmp_path)
    assert (ex.name, ex.negative, ex.box, ex.path) == (name, negative, box, tmp_path / file)


@pytest.mark.parametrize("text, words", [("nobox.png", "NAME=IMAGE"), ("a=", "NAME=IMAGE"),
                                         ("a=ref.png@1,2,3", "four numbers"), ("a=ref.png@1,2,3,4,5", "four numbers"),
                                         ("a=ref.png@1,,3,4", "four numbers")])
def test_parse_exemplar_errors(ref, text, words):
    with pytest.raises(ClassSpecError, match=words):
        parse_exemplar(text, base=ref.parent)


def test_mean_and_fusion_maths():
    a, b = torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0])
    assert torch.allclose(mean_embedding(torch.stack([a, b])), F.normalize(torch.tensor([1.0, 1, 0]), dim=0))
    weighted = mean_embedding(torch.stack([a, b]), [3, 1])
    assert torch.allclose(weighted, F.normalize(torch.tensor([3.0, 1, 0]), dim=0))
    text = torch.tensor([[0, 0, 1.0], [0, 1.0, 0]])
    fused = fuse(text, a, 0.25)
    assert torch.allclose(fused[0], F.normalize(torch.tensor([0.25, 0, 0.75]), dim=0))
    assert torch.allclose(fuse(text, a, 0.0), text) and torch.allclose(fuse(text, a, 1.0), a.expand(2, 3))
    assert torch.allclose(fused.norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------- into a ClassSpec

def _fake_encoders():
    texts: list[list[str]] = []
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def vector(key: str) -> torch.Tensor:
        if key not in table:
            table[key] = F.normalize(torch.randn(16, generator=gen), dim=0)
        return table[key]

    def encode(prompts):
        texts.append(list(prompts))
        return torch.stack([vector(p) for p in prompts])

    def encode_exemplars(exemplars):
        return torch.stack([vector(e.key) for e in exemplars])

    return encode, encode_exemplars, vector, texts


def test_list_items_join_their_class_and_rows_are_fused(ref):
    near = Exemplar(ref, box=(0, 0, 20, 20), name="Forklift")
    far = Exemplar(ref, box=(20, 20, 60, 50), name="forklift", weight=3)
    jack = Exemplar(ref, box=(5, 5, 40, 40), name="pallet jack")
    neg = Exemplar(ref, box=(1, 1, 9, 9), negative=True)
    spec = parse_classes([near, "forklift|lift truck", jack, far, "!glare", neg])
    assert spec.names == ["Forklift", "pallet jack"]
    assert [len(c.exemplars) for c in spec.classes] == [2, 1]
    assert spec.classes[0].prompts == ("forklift", "lift truck")
    assert [c for _, c in spec.columns] == [0, 0, 1, -1, -1]
    encode, encode_exemplars, vector, texts = _fake_encoders()
    rows = spec.embed(encode, encode_exemplars)
    assert isinstance(rows, np.ndarray) and rows.dtype == np.float32
    rows = torch.from_numpy(rows)
    assert texts == [["forklift", "lift truck", "glare"]]  # exemplar-only classes encode no words
    mean = mean_embedding(torch.stack([vector(near.key), vector(far.key)]), [1, 3])
    assert torch.allclose(rows[0], fuse(vector("forklift")[None], mean, DEFAULT_FUSE)[0], atol=1e-6)
    assert torch.allclose(rows[1], fuse(vector("lift truck")[None], mean, DEFAULT_FUSE)[0], atol=1e-6)
    assert torch.allclose(rows[2], vector(jack.key), atol=1e-6)
    assert torch.allclose(rows[3], vector("glare")) and torch.allclose(rows[4], vector(neg.key), atol=1e-6)


def test_exemplars_need_an_encoder(ref):
    spec = parse_classes([Exemplar(ref, name="a")])
    with pytest.raises(ClassSpecError, match="need a detector"):
        spec.embed(lambda p: torch.zeros(len(p), 4))


def test_extra_exemplars_argument_and_only_exemplars(ref):
    ex = Exemplar(ref, name="bus")
    spec = parse_classes("car,bus", exemplars=[ex, Exemplar(ref, name="tram")])
    assert spec.names == ["car", "bus", "tram"] and spec.classes[1].exemplars == (ex,)
    only = parse_classes(None, exemplars=[ex])
    assert only.names == ["bus"] and only.classes[0].prompts == () and only.is_plain
    assert parse_classes(ex).names == ["bus"]


def test_records_for_run_json(ref):
    spec = parse_classes(["car", Exemplar(ref, box=(1, 2, 3, 4), name="car", source="region")])
    assert spec.record()["classes"] == [{"name": "car", "prompts": ["car"], "conf": None, "fuse": DEFAULT_FUSE}]
    record, = spec.exemplar_records()
    assert record["sha256"] == Exemplar(ref, name="x").sha256 and record["box"] == [1, 2, 3, 4]
    assert record["source"] == "region" and record["class"] == "car"
    json.dumps(spec.exemplar_records())
    plain = parse_classes("car|auto,!glare")
    assert plain.record() == {"classes": [{"name": "car", "prompts": ["car", "auto"], "conf": None}],
                              "negatives": ["glare"], "templates": [], "reduce": "max"}
    assert plain.exemplar_records() == []


def test_class_file_exemplars_relative_to_the_file(tmp_path):
    folder = tmp_path / "cfg"
    (folder / "refs").mkdir(parents=True)
    cv2.imwrite(str(folder / "refs" / "jack.png"), _image())
    cv2.imwrite(str(folder / "glare.png"), _image(seed=2))
    (folder / "classes.yaml").write_text(
        "negatives: [reflection, {image: glare.png}]\n"
        "classes:\n"
        "  - name: pallet jack\n"
        "    exemplars: [{image: refs/jack.png, box: [1, 2, 30, 40]}, 'refs/jack.png@0,0,10,10', '!glare.png']\n"
        "    fuse: 0.3\n"
        "  - name: zorblax\n"
        "    prompts: []\n"
        "    exemplars: [refs/jack.png]\n"
        "  - car\n")
    spec = parse_classes(folder / "classes.yaml")
    jack, zorblax, car = spec.classes
    assert [e.box for e in jack.exemplars] == [(1, 2, 30, 40), (0, 0, 10, 10)] and jack.fuse == 0.3
    assert jack.prompts == ("pallet jack",) and zorblax.prompts == () and car.exemplars == ()
    assert all(e.path == folder / "refs" / "jack.png" for e in jack.exemplars + zorblax.exemplars)
    assert [e.path.name for e in spec.negative_exemplars] == ["glare.png", "glare.png"]
    assert all(e.negative for e in spec.negative_exemplars) and spec.negatives == ("reflection",)


@pytest.mark.parametrize("entry, words", [
    ("{image: /etc/hostname}", "absolute path"),
    ("{image: ../outside.png}", "outside the class file's folder"),
    ("{image: link.png}", "outside the class file's folder"),
    ("{image: missing.png}", "missing.png does not exist"),
    ("{image: ok.png, box: [5, 5, 5, 9]}", "zero area"),
    ("{image: ok.png, colour: red}", "unknown key 'colour'"),
    ("{box: [1, 2, 3, 4]}", "needs image"),
    ("'ok.png@1,2,3'", "four numbers"),
    ("{image: ok.png, negative: maybe}", "true or false"),
])
def test_class_file_exemplar_errors_give_file_and_line(tmp_path, entry, words):
    folder = tmp_path / "cfg"
    folder.mkdir()
    cv2.imwrite(str(tmp_path / "outside.png"), _image())
    cv2.imwrite(str(folder / "ok.png"), _image())
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    path = folder / "classes.yaml"
    path.write_text(f"classes:\n  - name: jack\n    exemplars:\n      - {entry}\n")
    with pytest.raises(ClassSpecError, match=words) as info:
        parse_classes(path)
    assert f"{path}:4" in str(info.value)


def test_class_with_neither_words_nor_exemplars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classes:\n  - name: jack\n    prompts: []\n")
    with pytest.raises(ClassSpecError, match="empty prompts list.*exemplars"):
        parse_classes(path)


def test_exemplar_cap(ref, monkeypatch):
    monkeypatch.setenv("OVDET_MAX_EXEMPLARS", "2")
    with pytest.raises(ClassSpecError, match="cap of 2.*OVDET_MAX_EXEMPLARS"):
        parse_classes([Exemplar(ref, name="a"), Exemplar(ref, name="a", box=(0, 0, 4, 4)),
                       Exemplar(ref, name="b")])
