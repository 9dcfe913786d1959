"""Embedding cache: exact round trips, identities that follow the weights, a lazy text tower that cached prompts
never construct, concurrent writers, the size bound, and the `ovdet classes` / `ovdet cache` commands."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import CLIPTextModelWithProjection

from conftest import random_world_model
from ovdet import OVDetector
from ovdet.cli import main
from ovdet.text.cache import EmbeddingCache, LazyTextEncoder, state_identity
from ovdet.text.tower import TextEncoder
from ovdet.weights.checkpoint import TEXT_ENCODER_KEY
from ovdet.util import safeio

COCO_LIKE = ["person", "bicycle", "car", "traffic light", "dog", "red backpack", "wine glass", "teddy bear"]
TOWER = "tower@0123456789abcdef"


def vector(prompt: str, dim: int = 512) -> np.ndarray:
    """A deterministic float32 vector per prompt, so any process can tell a right entry from a wrong one."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def vectors(prompts):
    return np.stack([vector(p) for p in prompts])


@pytest.fixture
def no_text_tower(monkeypatch):
    """Make any construction or loading of a text tower fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was constructed")

    for name in ("__init__", "load", "from_state", "from_openai_state_dict", "random"):
        monkeypatch.setattr(TextEncoder, name, refuse)
    monkeypatch.setattr(CLIPTextModelWithProjection, "__init__", refuse)
    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", refuse)


def save_folder(path, seed):
    encoder = TextEncoder.random(seed=seed)
    encoder.model.save_pretrained(path)
    return encoder


def openai_state_dict(seed: int, width: int = 64) -> dict[str, torch.Tensor]:
    """A random one-layer text tower in OpenAI CLIP's state-dict layout (what ViT-B-32.pt holds)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    block = "transformer.resblocks.0."
    sd = {"token_embedding.weight": rand(49408, width), "positional_embedding": rand(77, width),
          "ln_final.weight": 1 + rand(width), "ln_final.bias": rand(width), "text_projection": rand(width, 512)}
    shapes = {"attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
              "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
              "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
              "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
              "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    sd.update({block + k: rand(*s) for k, s in shapes.items()})
    return sd


# ---------------------------------------------------------------- the cache itself

def test_round_trip_is_exact_and_keyed_by_tower_and_exact_prompt(tmp_path):
    cache = EmbeddingCache(tmp_path)
    prompts = ["person", "Person", "café 日本語", "a photo of a {}"]
    cache.put(TOWER, prompts, vectors(prompts))
    got = cache.get(TOWER, prompts + ["unknown"])
    assert list(got) == prompts
    for p in prompts:
        assert got[p].dtype == np.float32 and np.array_equal(got[p], vector(p))
    assert not np.array_equal(got["person"], got["Person"])  # exact strings, not normalised ones
    assert cache.get("other@fedcba9876543210", prompts) == {}


def test_damaged_entries_are_misses(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put(TOWER, ["a", "b", "c"], vectors(["a", "b", "c"]))
    path_a, path_b, path_c = (cache._entry(TOWER, p) for p in "abc")
    path_a.write_bytes(path_a.read_bytes()[:-7])  # truncated
    path_b.write_bytes(path_c.read_bytes())  # another prompt's entry under b's name (a hash collision)
    data = bytearray(path_c.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit
    path_c.write_bytes(bytes(data))
    assert cache.get(TOWER, ["a", "b", "c"]) == {}
    assert not path_a.exists() and not path_c.exists()


def test_size_bound_evicts_least_recently_used(tmp_path):
    probe = EmbeddingCache(tmp_path / "probe")
    probe.put(TOWER, ["x"], vectors(["x"]))
    entry = probe.info().bytes
    cache = EmbeddingCache(tmp_path / "cache", max_bytes=10 * entry)
    first, second, third = ([f"{name} {i}" for i in range(4)] for name in ("first", "second", "third"))
    cache.put(TOWER, first, vectors(first))
    cache.put(TOWER, second, vectors(second))
    now = time.time()
    for i, prompt in enumerate(first + second):  # written long ago: second older than first
        age = 2 * 3600 if prompt in first else 3 * 3600
        os.utime(cache._entry(TOWER, prompt), (now - age, now - age - i))
    assert len(cache.get(TOWER, first)) == 4  # a hit marks `first` as recently used
    cache.put(TOWER, third, vectors(third))  # 12 entries > 10: evict down to 9
    info = cache.info()
    assert info.entries == 9 and info.bytes <= cache.max_bytes
    assert len(cache.get(TOWER, first)) == 4 and len(cache.get(TOWER, third)) == 4
    assert len(cache.get(TOWER, second)) == 1


def test_info_and_clear(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put(TOWER, ["a", "b"], vectors(["a", "b"]))
    cache.put("other/tower@fedcba9876543210", ["a"], vectors(["a"]))
    info = cache.info()
    assert info.entries == 3 and info.bytes > 0 and info.root == tmp_path
    assert [(t.identity, t.entries) for t in info.towers] == [("other/tower@fedcba9876543210", 1), (TOWER, 2)]
    assert cache.clear().entries == 3
    assert cache.info().entries == 0 and cache.get(TOWER, ["a"]) == {}
    cache.put(TOWER, ["a"], vectors(["a"]))  # usable again after a clear
    assert len(cache.get(TOWER, ["a"])) == 1


def test_a_clear_between_folder_and_file_is_survived(tmp_path):
    """Another process's `ovdet cache clear` removes the tower folder after a writer opened it: the write is redone
    in a fresh folder, not lost and not an error."""
    cache = EmbeddingCache(tmp_path)
    cache.put(TOWER, ["a"], vectors(["a"]))
    real_create, cleared = safeio.Folder._create, []

    def create_after_a_clear(folder, name):
        if not cleared:
            cleared.append(EmbeddingCache(tmp_path).clear())  # the folder `folder` holds open is gone now
        return real_create(folder, name)

    with mock.patch.object(safeio.Folder, "_create", create_after_a_clear), warnings.catch_warnings():
        warnings.simplefilter("error")  # put() warns when it cannot write: it must not come to that
        cache.put(TOWER, ["b"], vectors(["b"]))
    assert cleared[0].entries == 1
    assert list(cache.get(TOWER, ["a", "b"])) == ["b"] and cache.info().entries == 1


def test_temporary_files_of_crashed_writers_are_removed_once_old(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put(TOWER, ["a"], vectors(["a"]))
    folder = cache._entry(TOWER, "a").parent
    old, fresh = folder / f".x.emb.0123{safeio.TMP_SUFFIX}", folder / f".y.emb.4567{safeio.TMP_SUFFIX}"
    legacy = folder / ".tmp-abcd.part"  # what versions before safeio left
    for path in (old, fresh, legacy):
        path.write_bytes(b"torn")
    hours_ago = time.time() - 2 * 3600
    for path in (old, legacy):
        os.utime(path, (hours_ago, hours_ago))
    assert cache.info().entries == 1
    assert not old.exists() and not legacy.exists()
    assert fresh.exists()  # may be a live writer's: left alone


def _writer(root: str, worker: int, rounds: int, max_bytes: int, evicting: bool) -> None:
    """Write shared and own prompts again and again while the others do; fail (exit code 1) on a wrong read, or,
    without eviction, on a miss of anything already written (a partial entry reads as a miss)."""
    cache = EmbeddingCache(root, max_bytes=max_bytes)
    shared = [f"shared prompt {i}" for i in range(20)]
    own = [f"worker {worker} prompt {i}" for i in range(10)]
    for r in range(rounds):
        prompts = shared[r % 3:] + own if worker % 2 else own + shared[::-1]
        cache.put(TOWER, prompts, vectors(prompts))
        got = cache.get(TOWER, shared + own)
        if not evicting and len(got) != len(shared) + len(own):
            raise AssertionError(f"worker {worker} missed {set(shared + own) - set(got)}")
        for prompt, value in got.items():
            if not np.array_equal(value, vector(prompt)):
                raise AssertionError(f"worker {worker} read a wrong embedding for {prompt!r}")


def _run_writers(root, workers, rounds, max_bytes=1 << 30):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    evicting = max_bytes < 1 << 30
    procs = [ctx.Process(target=_writer, args=(str(root), w, rounds, max_bytes, evicting)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers


def test_concurrent_writers_do_not_corrupt(tmp_path):
    _run_writers(tmp_path, workers=4, rounds=20)
    cache = EmbeddingCache(tmp_path)
    prompts = [f"shared prompt {i}" for i in range(20)]
    prompts += [f"worker {w} prompt {i}" for w in range(4) for i in range(10)]
    got = cache.get(TOWER, prompts)
    assert len(got) == 60 and all(np.array_equal(v, vector(p)) for p, v in got.items())
    assert cache.info().entries == 60
    assert not [p for p in (tmp_path / "prompts").rglob("*") if p.name.endswith(safeio.TMP_SUFFIX)]


def test_concurrent_writers_with_eviction(tmp_path):
    probe = EmbeddingCache(tmp_path / "probe")
    probe.put(TOWER, ["x"], vectors(["x"]))
    limit = 25 * probe.info().bytes
    _run_writers(tmp_path / "cache", workers=4, rounds=10, max_bytes=limit)  # hits checked inside the workers
    cache = EmbeddingCache(tmp_path / "cache", max_bytes=limit)
    cache.evict()  # the last writers may have finished while others were still writing
    assert 0 < cache.info().bytes <= limit


# ---------------------------------------------------------------- identities

def test_file_identity_follows_content_not_name_or_mtime(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    path = tmp_path / "ViT-B-32.pt"
    path.write_bytes(b"A" * 1000)
    first = cache.source_identity(path)
    assert first == cache.source_identity(path) and first.startswith("ViT-B-32@")
    st = path.stat()
    path.write_bytes(b"B" * 1000)  # same size, and the modification time put back
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.source_identity(path) != first


def test_state_identity_follows_weights():
    state = TextEncoder.random(seed=0).to_state()
    first = state_identity(state)
    assert first == state_identity(TextEncoder.random(seed=0).to_state())
    state["state_dict"]["text_projection.weight"][0, 0] += 1e-3
    assert state_identity(state) != first


def test_folder_tower_cache_hit_never_constructs_it(tiny_world_checkpoint, tmp_path, request):
    folder = tmp_path / "text"
    encoder = save_folder(folder, seed=0)
    det = OVDetector(tiny_world_checkpoint, text_model=folder, device="cpu", imgsz=160)
    det.set_classes(COCO_LIKE)
    expected = det.world._txt_feats.clone()
    np.testing.assert_allclose(expected[0].numpy(), encoder.encode(COCO_LIKE).numpy(), atol=1e-6)
    request.getfixturevalue("no_text_tower")
    fresh = OVDetector(tiny_world_checkpoint, text_model=folder, device="cpu", imgsz=160)
    fresh.set_classes(list(reversed(COCO_LIKE)))
    assert torch.equal(fresh.world._txt_feats[0], expected[0].flip(0))
    assert fresh.classes == list(reversed(COCO_LIKE))
    with pytest.raises(AssertionError, match="constructed"):  # a new prompt does need the tower
        fresh.set_classes(["a prompt never seen"])


def test_folder_weights_change_changes_the_key(tiny_world_checkpoint, tmp_path):
    folder = tmp_path / "text"
    save_folder(folder, seed=0)
    det = OVDetector(tiny_world_checkpoint, text_model=folder, device="cpu", imgsz=160)
    det.set_classes(COCO_LIKE)
    old_identity = det.text_identity
    new_encoder = save_folder(folder, seed=1)  # new weights in the same folder
    fresh = OVDetector(tiny_world_checkpoint, text_model=folder, device="cpu", imgsz=160)
    assert fresh.text_identity != old_identity
    fresh.set_classes(COCO_LIKE)
    np.testing.assert_allclose(fresh.world._txt_feats[0].numpy(), new_encoder.encode(COCO_LIKE).numpy(), atol=1e-6)


def test_weights_replaced_before_first_load_are_keyed_by_what_was_loaded(tmp_path):
    folder = tmp_path / "text"
    save_folder(folder, seed=0)
    tower = LazyTextEncoder(folder)
    stale = tower.identity  # computed, but nothing loaded yet
    new_encoder = save_folder(folder, seed=1)
    emb = tower.encode(["dog"])
    assert tower.identity != stale
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32  # no torch needed to hand them on
    np.testing.assert_allclose(emb, new_encoder.encode(["dog"]).numpy(), atol=1e-6)
    assert tower.cache.get(stale, ["dog"]) == {} and len(tower.cache.get(tower.identity, ["dog"])) == 1


def test_embedded_tower_cache_hit(tmp_path, request):
    encoder = TextEncoder.random(seed=3)
    ckpt = tmp_path / "trained.pt"
    torch.save({"model": random_world_model(), "train_args": {}, TEXT_ENCODER_KEY: encoder.to_state()}, ckpt)
    det = OVDetector(ckpt, device="cpu", imgsz=160)
    det.set_classes(COCO_LIKE)
    np.testing.assert_allclose(det.world._txt_feats[0].numpy(), encoder.encode(COCO_LIKE).numpy(), atol=1e-6)
    request.getfixturevalue("no_text_tower")
    fresh = OVDetector(ckpt, device="cpu", imgsz=160)
    fresh.set_classes(COCO_LIKE)
    assert torch.equal(fresh.world._txt_feats, det.world._txt_feats)


def test_default_openai_file_tower_hit_and_weight_change(tiny_world_checkpoint, monkeypatch, clip_stand_in):
    from ovdet.weights.registry import weights_dir

    weights_dir().mkdir(parents=True)
    path = weights_dir() / "ViT-B-32.pt"
    torch.save(openai_state_dict(seed=0), path)
    det = OVDetector(tiny_world_checkpoint, device="cpu", imgsz=160)  # text_model None: the default ViT-B-32.pt
    det.set_classes(COCO_LIKE)
    assert det.text_identity.startswith("ViT-B-32@")
    with monkeypatch.context() as patch:
        patch.setattr(TextEncoder, "load", lambda *a, **k: pytest.fail("loaded the tower on a cache hit"))
        OVDetector(tiny_world_checkpoint, device="cpu", imgsz=160).set_classes(COCO_LIKE)
    torch.save(openai_state_dict(seed=1), path)
    fresh = OVDetector(tiny_world_checkpoint, device="cpu", imgsz=160)
    assert fresh.text_identity != det.text_identity
    fresh.set_classes(COCO_LIKE)
    assert not torch.allclose(fresh.world._txt_feats, det.world._txt_feats)


# ---------------------------------------------------------------- commands

def test_cli_classes_show(tmp_path, capsys):
    path = tmp_path / "classes.yaml"
    path.write_text("negatives: [reflection]\nclasses:\n  - person|man\n  - name: helmet\n    conf: 0.1\n")
    assert main(["classes", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "person | man" in out and "helmet" in out and "0.1" in out and "reflection" in out
    assert main(["classes", "show", "a|b,!c", "--templates", "--reduce", "mean"]) == 0
    out = capsys.readouterr().out
    assert "a | b" in out and "a photo of a {}." in out and "mean" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  - person\n  - 'a||b'\n")
    assert main(["classes", "show", str(bad)]) == 2
    assert f"{bad}:3" in capsys.readouterr().err


def test_cli_encode_then_cache_info_and_clear(tmp_path, capsys, request):
    folder = tmp_path / "text"
    save_folder(folder, seed=0)
    args = ["classes", "encode", "person|man,bus,!reflection", "--text-model", str(folder), "--device", "cpu"]
    assert main(args) == 0
    assert "4 prompt(s) for 2 class(es): 0 already cached, 4 encoded" in capsys.readouterr().out
    assert main(args[:3] + ["--templates"] + args[3:]) == 0
    assert "already cached" in capsys.readouterr().out
    request.getfixturevalue("no_text_tower")
    assert main(args) == 0  # all cached: the tower is not even constructed
    assert "4 already cached, 0 encoded" in capsys.readouterr().out
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "text@" in out and "in 28 entries" in out  # 4 phrasings x 7 templates, "{}" being the bare ones
    assert main(["cache", "clear"]) == 0
    assert "Removed 28 cached embedding(s)" in capsys.readouterr().out
    assert main(["cache", "info"]) == 0
    assert "in 0 entries" in capsys.readouterr().out


def test_cli_encode_for_a_detector_with_embedded_tower(tmp_path, capsys, request):
    ckpt = tmp_path / "trained.pt"
    torch.save({"model": random_world_model(), "train_args": {},
                TEXT_ENCODER_KEY: TextEncoder.random(seed=5).to_state()}, ckpt)
    spec = tmp_path / "classes.json"
    spec.write_text('{"classes": ["person", {"name": "helmet", "synonyms": ["hard hat"], "conf": 0.1}]}')
    assert main(["classes", "encode", str(spec), "--model", str(ckpt), "--device", "cpu"]) == 0
    assert "3 encoded" in capsys.readouterr().out
    request.getfixturevalue("no_text_tower")
    det = OVDetector(ckpt, device="cpu", imgsz=160)
    det.set_classes(spec)
    assert det.classes == ["person", "helmet"]
