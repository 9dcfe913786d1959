"""CLIP text tower on `transformers`: offline tokenizer, OpenAI-CLIP weight conversion, prompt → normalized embedding.

The tokenizer is a transformers `CLIPTokenizer` built in memory from the BPE vocabulary that open_clip ships,
with open_clip's own text cleaning, so token ids equal `open_clip.tokenize` (and OpenAI CLIP's) exactly.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import re
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ftfy
import torch
import torch.nn.functional as F

from ovdet.errors import ClassSpecError, ModelError, WeightsCorruptError, WeightsNotFoundError
from ovdet.util.env import is_offline
from ovdet.util.hashing import state_digest

if TYPE_CHECKING:  # imported where a tower is built or a prompt tokenized: cached embeddings never need them
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
# transformers' CLIPTextModel pools the hidden state at argmax(input_ids) when eos_token_id == 2 (the "legacy"
# branch): exactly OpenAI CLIP's / open_clip's pooling, whatever the prompt contains.
ARGMAX_POOLING_EOS_ID = 2
_SOT, _EOT = "<start_of_text>", "<end_of_text>"  # open_clip's names; it matches them literally inside prompts too
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP uses the first 48894 merges of the file
_OPENAI_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_LAYER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_LAYER_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}


def map_resblocks(sd: dict[str, Any], layer_key: re.Pattern[str], prefix: str, out: dict[str, Any],
                  used: set[str]) -> None:
    """Put an OpenAI CLIP tower's resblock tensors (keys matched by `layer_key`: block index, then the rest) into
    `out` under transformers' names below `prefix`, splitting attention's in_proj into q, k, v; record each key
    taken in `used` (the caller refuses any key left over)."""
    for key, value in sd.items():
        m = layer_key.match(key)
        if m is None:
            continue
        block, rest = f"{prefix}.{m.group(1)}.", m.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{block}self_attn.{name}_proj.{kind}"] = part
        elif rest in _LAYER_RENAMES:
            out[block + _LAYER_RENAMES[rest]] = value
        else:
            continue
        used.add(key)


def _bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (slow)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"ovdet's tokenizer needs CLIP's BPE vocabulary ({_BPE_FILE}), shipped with open_clip: "
                         "run `pip install open_clip_torch`.")
    return Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 byte values mapped to printable characters, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE tokenizer (transformers, built in memory from open_clip's vocabulary file; no network)."""
    from transformers import CLIPTokenizer

    path = _bpe_path()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except OSError as exc:
        raise ModelError(f"Cannot read CLIP's BPE vocabulary {path}: {exc}. Reinstall open_clip_torch "
                         "(`pip install --force-reinstall open_clip_torch`).") from exc
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [_SOT, _EOT]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, bos_token=_SOT, eos_token=_EOT,
                        unk_token=_EOT, pad_token=_EOT)
    # Text is cleaned in Python exactly as open_clip does (`_clean`); the backend's own normalizer (NFC after
    # lowercasing) differs on rare characters such as "İ", so it is switched off.
    tok.backend_tokenizer.normalizer = None
    if len(tok) != VOCAB_SIZE or tok.bos_token_id != SOT_TOKEN_ID or tok.eos_token_id != EOT_TOKEN_ID:
        raise ModelError(f"CLIP's BPE vocabulary {path} looks wrong ({len(tok)} tokens, expected {VOCAB_SIZE}). "
                         "Reinstall open_clip_torch.")
    return tok


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def tokenize(prompts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """CLIP token ids [N, context_length], equal to `open_clip.tokenize`: SOT, BPE ids, EOT, zero padding.

    Prompts longer than the context are cut so that EOT stays the last token; one UserWarning names them.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ClassSpecError(f"Prompt #{i} is {type(prompt).__name__} ({prompt!r}); prompts must be strings.")
    ids = torch.zeros(len(prompts), context_length, dtype=torch.long)
    if not prompts:
        return ids
    encoded = clip_tokenizer()([_clean(p) for p in prompts], add_special_tokens=False)["input_ids"]
    truncated = []
    for i, body in enumerate(encoded):
        row = [SOT_TOKEN_ID, *body, EOT_TOKEN_ID]
        if len(row) > context_length:
            row = row[:context_length - 1] + [EOT_TOKEN_ID]
            truncated.append(prompts[i])
        ids[i, :len(row)] = torch.tensor(row)
    if truncated:
        shown = ", ".join(repr(p if len(p) <= 60 else p[:57] + "...") for p in truncated)
        warnings.warn(f"{len(truncated)} prompt(s) longer than CLIP's {context_length}-token context were truncated: "
                      f"{shown}. Shorten them to keep every word.", UserWarning, stacklevel=2)
    return ids


def _openai_text_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The text-tower tensors of an OpenAI-layout CLIP state dict (unwraps {"state_dict": ...} and "module.")."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsCorruptError(f"{source} holds a {type(obj).__name__}, not a CLIP state dict. Give the "
                                  "OpenAI-format ViT-B-32.pt (or a state dict saved from it).")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(k, str)}
    sd = {k: v for k, v in sd.items() if k.startswith(_OPENAI_TEXT_KEYS)}
    missing = [k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
               if not isinstance(sd.get(k), torch.Tensor)]
    if missing:
        raise WeightsCorruptError(f"{source} is not an OpenAI-format CLIP model: missing {', '.join(missing)}. "
                                  "Give the OpenAI ViT-B-32.pt, a Hugging Face CLIP folder or id.")
    return sd


def convert_openai_state_dict(sd: Mapping[str, torch.Tensor],
                              num_attention_heads: int | None = None) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """OpenAI CLIP (text tower) state dict → (CLIPTextConfig, CLIPTextModelWithProjection state dict), float32.

    Sizes come from tensor shapes; heads default to width // 64 (OpenAI's rule) since shapes cannot tell them.
    """
    from transformers import CLIPTextConfig

    sd = _openai_text_state_dict(sd, "The state dict")
    width = sd["ln_final.weight"].shape[0]
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    if layers != list(range(len(layers))) or "transformer.resblocks.0.mlp.c_fc.weight" not in sd:
        raise WeightsCorruptError(f"The CLIP state dict has an incomplete transformer (layers {layers}).")
    heads = num_attention_heads or max(1, width // 64)
    if heads < 1 or width % heads:
        raise ModelError(f"num_attention_heads={heads} does not fit a text tower of width {width}: give a divisor "
                         f"of {width} (OpenAI's CLIP uses width // 64).")
    config = CLIPTextConfig(
        vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=sd["text_projection"].shape[1], num_hidden_layers=len(layers), num_attention_heads=heads,
        max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="quick_gelu",
        eos_token_id=ARGMAX_POOLING_EOS_ID)
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t(),
    }
    used = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection"}
    map_resblocks(sd, _LAYER_KEY, "text_model.encoder.layers", out, used)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise WeightsCorruptError(f"The CLIP state dict has text-tower tensors ovdet cannot map to transformers' "
                                  f"CLIP: {', '.join(unknown[:5])}. Only OpenAI's CLIP architecture is supported.")
    return config, {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def _read_weights_file(path: Path) -> Any:
    """A TorchScript archive's parameters and buffers (OpenAI's format), read without running TorchScript, or a
    plain torch.save state dict read by torch's weights-only unpickler; a clear error if neither.

    A zip is opened only after ovdet.weights.torchzip's checks (both zip readers agree, bounded size), so torch.load never
    sees a file that hides a TorchScript program behind a harmless-looking directory; torch.jit.load is not used.
    """
    from ovdet.weights.scriptstate import torchscript_state_dict
    from ovdet.weights.torchzip import opened

    def corrupt(exc: Exception) -> WeightsCorruptError:
        detail = (str(exc).splitlines() or [""])[0][:300]
        return WeightsCorruptError(
            f"{path} ({path.stat().st_size} bytes) is not a readable CLIP weights file: it is truncated, corrupt or "
            f"not a PyTorch file ({type(exc).__name__}: {detail}). Delete it and download it again, or import a "
            "good copy with `ovdet weights import PATH`; for a Hugging Face model pass its folder.")

    with path.open("rb") as file:
        zipped = file.read(4) == b"PK\x03\x04"  # what torch.load looks at to tell a zip from a legacy pickle
    if zipped:
        try:
            with opened(path) as archive:
                if archive.torchscript_marks():
                    return torchscript_state_dict(archive)
        except WeightsCorruptError as exc:
            raise corrupt(exc) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip failure means the same thing to the user
        raise corrupt(exc) from exc


def _from_pretrained(source: str, what: str, local: bool) -> CLIPTextModelWithProjection:
    """`CLIPTextModelWithProjection.from_pretrained` (also takes a full CLIPModel); refuses partially loaded weights."""
    from transformers import CLIPTextModelWithProjection

    offline = is_offline()
    try:
        model, info = CLIPTextModelWithProjection.from_pretrained(
            source, local_files_only=offline, dtype=torch.float32, output_loading_info=True)
    except OSError as exc:
        if local:
            raise WeightsCorruptError(f"{what} is not a usable Hugging Face CLIP model folder: "
                                      f"{str(exc).rstrip('.')}. Re-save it with save_pretrained.") from exc
        mode = " (offline: only the local Hugging Face cache was searched)" if offline else ""
        raise WeightsNotFoundError(
            f"Cannot load a CLIP text model from {what}{mode}: {str(exc).rstrip('.')}. Give a local folder "
            "(save_pretrained / huggingface-cli download) or the OpenAI ViT-B-32.pt file.") from exc
    except Exception as exc:  # transformers/safetensors raise many types for broken files; keep the cause
        raise WeightsCorruptError(f"{what} holds a broken or non-CLIP model ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}). Download it again.") from exc
    missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    if missing:
        raise WeightsCorruptError(f"{what} lacks CLIP text-tower weights ({len(missing)} missing or mis-shaped, "
                                  f"e.g. {missing[0]}): it is not a CLIP model, or an incomplete download.")
    return model


class TextEncoder:
    """CLIP text tower (`CLIPTextModelWithProjection`, eval mode): prompts → L2-normalized float32 embeddings."""

    def __init__(self, model: CLIPTextModelWithProjection, name: str, device: str | torch.device = "cpu"):
        if model.config.vocab_size != VOCAB_SIZE:
            raise ModelError(f"Text model {name!r} has a {model.config.vocab_size}-token vocabulary; ovdet tokenizes "
                             f"with CLIP's {VOCAB_SIZE}-token BPE, so only CLIP text towers can be used.")
        self.model = model.to(device=torch.device(device), dtype=torch.float32).eval().requires_grad_(False)
        self.name = name
        self._identity: str | None = None

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "cpu",
             num_attention_heads: int | None = None) -> TextEncoder:
        """From an OpenAI-format .pt file (TorchScript or state dict), a local HF folder, or a Hugging Face id.

        `num_attention_heads` overrides the width // 64 guess for OpenAI-format files (needed for small towers).
        """
        path = Path(source).expanduser()
        if path.is_file():
            sd = _openai_text_state_dict(_read_weights_file(path), str(path))
            return cls.from_openai_state_dict(sd, name=path.stem, num_attention_heads=num_attention_heads,
                                              device=device)
        if path.is_dir():
            return cls(_from_pretrained(str(path), f"folder {path}", local=True), path.name, device)
        text = str(source)
        if path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or text.startswith((".", "/", "~")):
            raise WeightsNotFoundError(f"Text model file or folder {path} does not exist. Check the path, or leave "
                                       "the text model unset for the default CLIP ViT-B/32.")
        return cls(_from_pretrained(text, f"Hugging Face id {text!r}", local=False), text, device)

    @classmethod
    def from_openai_state_dict(cls, sd: Mapping[str, torch.Tensor], name: str = "openai-clip",
                               num_attention_heads: int | None = None,
                               device: str | torch.device = "cpu") -> TextEncoder:
        """From an OpenAI-layout CLIP state dict (visual.* ignored), converted to transformers' layout in memory."""
        from transformers import CLIPTextModelWithProjection

        config, state = convert_openai_state_dict(sd, num_attention_heads)
        model = CLIPTextModelWithProjection(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsCorruptError(f"The CLIP weights of {name!r} have inconsistent shapes: {exc}") from exc
        return cls(model, name, device)

    @classmethod
    def random(cls, seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 2,
               projection_dim: int = 512, device: str | torch.device = "cpu",
               initializer_factor: float = 1.0) -> TextEncoder:
        """A seeded random CLIP text tower (CLIP's vocabulary and context), deterministic on CPU; for tests and demos.

        transformers' CLIP init already keeps prompts apart (max cosine ≈ 0.9 on the default size); a larger
        `initializer_factor` spreads them further.
        """
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        config = CLIPTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            projection_dim=projection_dim, max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu",
            eos_token_id=ARGMAX_POOLING_EOS_ID, initializer_factor=float(initializer_factor))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModelWithProjection(config)
        return cls(model, f"random-clip-text-s{seed}", device)

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: str | torch.device = "cpu") -> TextEncoder:
        """Rebuild a tower saved with `to_state()` (e.g. embedded in an ovdet detector checkpoint)."""
        from huggingface_hub.errors import StrictDataclassError
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        try:
            config = CLIPTextConfig.from_dict(dict(state["config"]))
            model = CLIPTextModelWithProjection(config)
            model.load_state_dict(state["state_dict"], strict=True)
            name = str(state["name"])
        except (KeyError, TypeError, ValueError, RuntimeError, StrictDataclassError) as exc:
            raise WeightsCorruptError(f"The embedded text tower cannot be rebuilt ({type(exc).__name__}: {exc}). "
                                      "Re-save the checkpoint, or pass a text model explicitly.") from exc
        return cls(model, name, device)

    def to_state(self) -> dict[str, Any]:
        """Plain-data snapshot (config dict, CPU state dict, name) for `from_state` / embedding in checkpoints."""
        return {"name": self.name, "config": self.model.config.to_dict(),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}

    @property
    def identity(self) -> str:
        """`name@sha` (16 hex of sha256 over the weights): a cache-key component that changes with any weight."""
        if self._identity is None:
            self._identity = f"{self.name}@{state_digest(self.model.state_dict())}"
        return self._identity

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.model.text_projection.weight.device

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the tower to `device`; returns self."""
        self.model.to(torch.device(device))
        return self

    def encode(self, prompts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalized float32 embeddings [N, dim] on `self.device`, `batch_size` prompts per forward."""
        tokens = tokenize(prompts, self.context_length)
        out = torch.empty(len(tokens), self.dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                batch = tokens[start:start + batch_size]
                # Causal attention: nothing after the pooled (EOT = argmax) position can change the result, so
                # the padding is cut off. Same embeddings, several times faster for short class names.
                batch = batch[:, :int(batch.argmax(dim=-1).max()) + 1].to(self.device)
                out[start:start + batch_size] = F.normalize(self.model(input_ids=batch).text_embeds.float(), dim=-1)
        return out  # allocated outside inference mode: a normal tensor that callers may use under autograd

    def __repr__(self) -> str:
        cfg = self.model.config
        return (f"TextEncoder({self.name!r}, width={cfg.hidden_size}, layers={cfg.num_hidden_layers}, "
                f"dim={self.dim}, device={self.device})")
