"""CLIP text tower: equality with open_clip's reference model and tokenizer, loading paths, state round trips."""

from __future__ import annotations

import random
import re
import warnings

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

from ovdet.errors import ClassSpecError, ModelError, WeightsCorruptError, WeightsNotFoundError
from ovdet.text.tower import EOT_TOKEN_ID, SOT_TOKEN_ID, TextEncoder, tokenize

LONG_PROMPT = "a very long prompt about " + " ".join(f"object{i}" for i in range(60))
TRICKY = [
    "person",
    "Café crème brûlée, naïve façade",
    "日本語のテキスト 中文",
    "dog 🐶🐱 and 👩‍👩‍👧 emoji",
    "hello, world!!! (yes) it's--done; we're I'LL they'd",
    "UPPER CASE PERSON",
    "fish &amp; chips &amp;amp; &lt;b&gt; &#39;quoted&#39;",
    "  lots   of\t\twhitespace \n here  ",
    "",
    "   ",
    "12345 3.14 $100",
    "Ångström İstanbul ΣΊΣΥΦΟΣ straße ﬁ",
    "mojibake cafÃ©",
    "<end_of_text> inside <start_of_text>",
    "İ\u3099 combining marks after lowercasing",  # lowercased İ needs no re-normalization (NFC would reorder)
]
PROMPTS = ["a cat", "person wearing a hat", "Café 日本語 🐶", "RED backpack!!", "", LONG_PROMPT]
WIDTH, HEADS, LAYERS = 64, 2, 2


@pytest.fixture(scope="module")
def reference():
    """open_clip's CLIP (quick_gelu, tiny vision) with seeded random weights; 1-d params perturbed so that
    layer-norm and bias mappings matter (their default init of ones/zeros would hide a mix-up)."""
    torch.manual_seed(0)
    model = CLIP(embed_dim=512, vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16,
                                                         image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS),
                 quick_gelu=True).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(scope="module")
def reference_files(reference, tmp_path_factory):
    """The reference weights as a plain state dict .pt and as a TorchScript archive (OpenAI's ViT-B-32.pt format)."""
    folder = tmp_path_factory.mktemp("clip")
    sd_path, jit_path = folder / "tiny-sd.pt", folder / "tiny-jit.pt"
    torch.save(reference.state_dict(), sd_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer notes
        traced = torch.jit.trace_module(reference, {"encode_text": (open_clip.tokenize(["a photo"]),)})
        torch.jit.save(traced, str(jit_path))
    return {"sd": sd_path, "jit": jit_path}


@pytest.fixture(scope="module")
def expected(reference):
    with torch.no_grad():
        return reference.encode_text(open_clip.tokenize(PROMPTS), normalize=True)


def _encode(encoder: TextEncoder, prompts, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the long prompt's truncation warning
        return encoder.encode(prompts, **kwargs)


# --- tokenizer -------------------------------------------------------------------------------------------------

def test_tokenize_matches_open_clip_on_tricky_prompts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is long enough to warn
        ids = tokenize(TRICKY)
    assert ids.dtype == torch.long and ids.shape == (len(TRICKY), 77)
    assert torch.equal(ids, open_clip.tokenize(TRICKY))
    assert ids[TRICKY.index(""), :3].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID, 0]


def test_tokenize_matches_open_clip_on_random_unicode():
    rng = random.Random(0)
    pools = [range(32, 127), range(0xA0, 0x250), range(0x370, 0x400), range(0x3040, 0x30FF),
             range(0x4E00, 0x4E80), range(0x1F600, 0x1F650), range(0, 32), range(0x2000, 0x2070),
             [0x130, 0x3A3, 0xDF, 0xFB01, 0x1E9E, 0x2126]]
    prompts = ["".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert torch.equal(tokenize(prompts), open_clip.tokenize(prompts))


def test_long_prompt_is_truncated_with_one_warning_and_eot_last():
    prompts = ["short", LONG_PROMPT, LONG_PROMPT.upper()]
    with pytest.warns(UserWarning) as record:
        ids = tokenize(prompts)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "2 prompt(s)" in messages[0] and "a very long prompt about" in messages[0]
    assert torch.equal(ids, open_clip.tokenize(prompts))
    assert ids[1, -1].item() == EOT_TOKEN_ID and (ids[1] != 0).all()
    assert ids[0, 2].item() == EOT_TOKEN_ID


def test_tokenize_edge_inputs():
    assert tokenize([]).shape == (0, 77)
    assert torch.equal(tokenize("a dog"), open_clip.tokenize(["a dog"]))
    with pytest.raises(ClassSpecError, match="#1"):
        tokenize(["ok", 3])


# --- equivalence with open_clip --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd", "jit"])
def test_openai_file_matches_open_clip(reference_files, expected, kind):
    encoder = TextEncoder.load(reference_files[kind], num_attention_heads=HEADS)
    emb = _encode(encoder, PROMPTS, batch_size=4)  # two batches
    assert emb.dtype == torch.float32 and emb.shape == (len(PROMPTS), 512) and emb.device.type == "cpu"
    assert (emb - expected).abs().max().item() <= 1e-5
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-6)
    cfg = encoder.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.projection_dim) == (64, 2, 2, 512)
    assert cfg.hidden_act == "quick_gelu" and encoder.dim == 512 and encoder.name == f"tiny-{kind}"


def test_fp16_and_wrapped_state_dicts(reference):
    """OpenAI files store fp16 weights; checkpoints may wrap them as {"state_dict": {"module.*": ...}}."""
    half = {k: v.half() for k, v in reference.state_dict().items()}
    rounded = CLIP(embed_dim=512, vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16,
                                                           image_size=32),
                   text_cfg=CLIPTextCfg(width=WIDTH, heads=HEADS, layers=LAYERS), quick_gelu=True).eval()
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    with torch.no_grad():
        want = rounded.encode_text(open_clip.tokenize(PROMPTS[:4]), normalize=True)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in half.items()}}
    encoder = TextEncoder.from_openai_state_dict(wrapped, name="half", num_attention_heads=HEADS)
    assert (encoder.encode(PROMPTS[:4]) - want).abs().max().item() <= 1e-5
    assert next(encoder.model.parameters()).dtype == torch.float32


def test_heads_default_and_validation(reference):
    sd = reference.state_dict()
    assert TextEncoder.from_openai_state_dict(sd).model.config.num_attention_heads == 1  # width // 64
    with pytest.raises(ModelError, match="num_attention_heads=3"):
        TextEncoder.from_openai_state_dict(sd, num_attention_heads=3)


# --- state, identity, randomness ----------------------------------------------------------------------------------

def test_state_round_trip_and_identity(tmp_path):
    encoder = TextEncoder.random(seed=0)
    assert re.fullmatch(r"random-clip-text-s0@[0-9a-f]{16}", encoder.identity)
    path = tmp_path / "ckpt.pt"
    torch.save({"ovdet_text_encoder": encoder.to_state()}, path)
    restored = TextEncoder.from_state(torch.load(path, weights_only=True)["ovdet_text_encoder"])
    assert restored.identity == encoder.identity
    assert torch.equal(restored.encode(PROMPTS[:5]), encoder.encode(PROMPTS[:5]))

    changed = TextEncoder.from_state(encoder.to_state())
    with torch.no_grad():
        changed.model.text_projection.weight[0, 0] += 1e-3
    assert changed.identity != encoder.identity and changed.identity.startswith("random-clip-text-s0@")


def test_from_state_rejects_garbage():
    state = TextEncoder.random(seed=0).to_state()
    state["state_dict"].pop("text_projection.weight")
    with pytest.raises(WeightsCorruptError, match="embedded text tower"):
        TextEncoder.from_state(state)
    with pytest.raises(WeightsCorruptError):
        TextEncoder.from_state({"name": "x"})


def test_random_is_seeded_and_spreads_prompts():
    a, b, c = TextEncoder.random(seed=0), TextEncoder.random(seed=0), TextEncoder.random(seed=1)
    assert a.identity.split("@")[1] == b.identity.split("@")[1] != c.identity.split("@")[1]
    probes = ["person", "bus", "red backpack", "a photo of a cat", "dog", "car", "traffic light", "person in a hat"]
    emb = a.encode(probes)
    assert torch.equal(emb, b.encode(probes))
    cos = emb @ emb.T
    assert cos[~torch.eye(len(probes), dtype=torch.bool)].max().item() < 0.95


def test_encode_shapes_device_and_autograd():
    encoder = TextEncoder.random(seed=0, hidden_size=32, num_attention_heads=2, projection_dim=16)
    assert encoder.to("cpu") is encoder and encoder.device == torch.device("cpu")
    assert encoder.encode([]).shape == (0, 16)
    emb = encoder.encode("a dog")
    assert emb.shape == (1, 16) and not emb.is_inference()
    weight = torch.ones(16, requires_grad=True)
    (emb * weight).sum().backward()  # embeddings can feed a trained head
    assert weight.grad is not None


# --- loading paths and errors ------------------------------------------------------------------------------------

def test_hf_folder_round_trip(tmp_path):
    encoder = TextEncoder.random(seed=3)
    encoder.model.save_pretrained(tmp_path / "tower")
    loaded = TextEncoder.load(tmp_path / "tower")
    assert loaded.name == "tower" and loaded.identity.split("@")[1] == encoder.identity.split("@")[1]
    assert torch.equal(_encode(loaded, PROMPTS), _encode(encoder, PROMPTS))


def test_full_clip_hf_folder_loads_text_tower(tmp_path):
    """A full CLIPModel folder (like openai/clip-vit-base-patch32) gives the text half, pooled the same way."""
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, eos_token_id=2),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16), projection_dim=512)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "clip")
    ids = tokenize(PROMPTS[:4])
    with torch.no_grad():
        out = clip.get_text_features(input_ids=ids)
    want = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
    assert (TextEncoder.load(tmp_path / "clip").encode(PROMPTS[:4]) - want).abs().max().item() <= 1e-6


def test_broken_or_foreign_hf_folder(tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(WeightsCorruptError, match="lacks CLIP text-tower weights"):
        TextEncoder.load(tmp_path / "bert")  # would otherwise load as a silently random tower
    TextEncoder.random(seed=0).model.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsCorruptError, match="broken or non-CLIP"):
        TextEncoder.load(tmp_path / "cut")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsCorruptError, match="not a usable Hugging Face CLIP model folder"):
        TextEncoder.load(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["truncate_jit", "truncate_sd", "junk", "empty"])
def test_corrupt_file_raises_weights_corrupt(reference_files, tmp_path, damage):
    bad = tmp_path / "ViT-B-32.pt"
    if damage == "truncate_jit":
        data = reference_files["jit"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "truncate_sd":
        data = reference_files["sd"].read_bytes()
        bad.write_bytes(data[: len(data) - 100])
    elif damage == "junk":
        bad.write_bytes(b"<html>404 not found</html>")
    else:
        bad.write_bytes(b"")
    with pytest.raises(WeightsCorruptError, match="truncated, corrupt") as info:
        TextEncoder.load(bad)
    assert str(bad) in str(info.value)


def test_wrong_kind_of_file_and_missing_path(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"model.0.conv.weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsCorruptError, match="not an OpenAI-format CLIP"):
        TextEncoder.load(other)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        TextEncoder.load(tmp_path / "missing.pt")


def test_offline_hf_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("OVDET_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="offline"):
        TextEncoder.load("ovdet-tests/no-such-model")
