"""Model names -> local files: the cache dir, lookups in other tools' caches, downloads only when online.

Every miss ends in a `WeightsNotFoundError` that names the file, the folders searched, where to put the file
and the `ovdet weights import PATH` command, so an offline machine can always be fixed by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


from ovdet.errors import ModelError, UnknownModelError, WeightsCorruptError, WeightsNotFoundError
from ovdet.util.env import home, is_offline
from ovdet.util.hashing import CHUNK as _CHUNK
from ovdet.util.hashing import cached_sha256

# Release tag that ultralytics 8.4 (`attempt_download_asset`) downloads its assets from.
ULTRALYTICS_ASSETS_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0"
# OpenAI's published CLIP ViT-B/32; the URL path embeds the file's sha256.
CLIP_VIT_B32_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
CLIP_VIT_B32_URL = f"https://openaipublic.azureedge.net/clip/models/{CLIP_VIT_B32_SHA256}/ViT-B-32.pt"
CLIP_VIT_B32_HF_ID = "openai/clip-vit-base-patch32"
DEFAULT_TEXT_MODEL = "clip-vit-b32"
DEMO_FILE = Path(__file__).resolve().parents[1] / "assets" / "demo-world.pt"

DOWNLOAD_TIMEOUT = 30.0  # seconds without data before a download is abandoned


@dataclass(frozen=True)
class ModelSpec:
    """One named model: its kind, file name, download URL and (when published) sha256."""

    name: str
    kind: str  # "detector" or "text"
    filename: str
    url: str | None = None
    sha256: str | None = None
    hf_id: str | None = None


class ModelRow(NamedTuple):
    """A row of `list_models()`: the name, its kind and the local file or folder (None when missing)."""

    name: str
    kind: str
    path: Path | None


def _registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec(f"yolov8{size}-{version}", "detector", f"yolov8{size}-{version}.pt",
                  f"{ULTRALYTICS_ASSETS_URL}/yolov8{size}-{version}.pt")
        for version in ("world", "worldv2")
        for size in "smlx"
    ]
    specs.append(ModelSpec("demo", "detector", DEMO_FILE.name))
    # ultralytics' SAM family for --masks, from the same release; no sha256 is published for them (ultralytics'
    # docs and downloads.py list none), so a download is checked as a torch archive and on load, not by hash
    specs += [ModelSpec(name, "segmenter", f"{name}.pt", f"{ULTRALYTICS_ASSETS_URL}/{name}.pt")
              for name in ("mobile_sam", "sam2.1_t", "sam2.1_b", "sam_b")]
    specs.append(ModelSpec(DEFAULT_TEXT_MODEL, "text", "ViT-B-32.pt", CLIP_VIT_B32_URL, CLIP_VIT_B32_SHA256,
                           CLIP_VIT_B32_HF_ID))
    return {spec.name: spec for spec in specs}


REGISTRY: dict[str, ModelSpec] = _registry()
# Other spellings of the default text tower (OpenAI's and open_clip's names).
_TEXT_ALIASES = {"vit-b/32", "vit-b-32", "vit-b-32.pt", "clip-vit-b32.pt"}


def weights_dir() -> Path:
    """Where ovdet downloads and imports weights files."""
    return home() / "weights"


def known_names(kind: str | None = None) -> list[str]:
    """Registry names, optionally only those of one kind ("detector", "text" or "segmenter")."""
    return [name for name, spec in REGISTRY.items() if kind is None or spec.kind == kind]


def _ultralytics_weights_dir() -> Path:
    from ultralytics.utils import SETTINGS  # deferred: importing ultralytics is slow

    return Path(SETTINGS["weights_dir"])


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _detector_dirs() -> list[Path]:
    return [weights_dir(), _ultralytics_weights_dir(), Path.cwd()]


def _text_dirs() -> list[Path]:
    ul = _ultralytics_weights_dir()
    return [weights_dir(), Path.home() / ".cache" / "clip", ul / "clip", ul]


def _find_file(filename: str, dirs: list[Path]) -> Path | None:
    return next((d / filename for d in dirs if (d / filename).is_file()), None)


def _hf_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a HF model repo with config and weights, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hf_cache_dir())
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    has_weights = any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    return folder if has_weights else None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def _not_found(what: str, filename: str, searched: list[Path], reason: str, url: str | None) -> WeightsNotFoundError:
    where = ", ".join(str(d) for d in dict.fromkeys(searched))
    fix = f"Download {url} on a machine with network access, then" if url else "Then"
    return WeightsNotFoundError(
        f"{what} '{filename}' was not found ({reason}). Searched: {where}. {fix} copy it to "
        f"{weights_dir() / filename} or run `ovdet weights import PATH`."
    )


def _checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a readable PyTorch zip checkpoint, or None when it is."""
    if not path.is_file():
        return "it is not a file"
    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return "it is not a zip archive, so it is truncated or not a PyTorch checkpoint"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"its zip directory cannot be read ({exc})"
    if not any(name.endswith("data.pkl") for name in names):
        return "the zip archive has no data.pkl, so it is not a PyTorch checkpoint"
    return None


def check_checkpoint(path: str | Path) -> Path:
    """Cheaply check that `path` is a readable torch zip archive; raise WeightsCorruptError otherwise."""
    path = Path(path)
    problem = _checkpoint_problem(path)
    if problem:
        raise WeightsCorruptError(
            f"{path} cannot be used as model weights: {problem}. Delete it and download it again, "
            "or re-import a good copy with `ovdet weights import PATH`."
        )
    return path


def verify_published(path: Path, spec: ModelSpec) -> Path:
    """Check a registry file against its published sha256 (cached by size + mtime); WeightsCorruptError if not."""
    if spec.sha256 and path.name == spec.filename and cached_sha256(path) != spec.sha256:
        raise WeightsCorruptError(
            f"{path} is not the published {spec.filename}: its sha256 differs from {spec.sha256}. Delete it and "
            f"download it again ({spec.url}), or import a good copy with `ovdet weights import PATH`."
        )
    return path


def _download(spec: ModelSpec, searched: list[Path], what: str) -> Path:
    """Download `spec.url` into weights_dir() atomically, checking size, sha256 and archive format."""
    import http.client  # here: `ovdet weights --help` reads this module and need not load these
    import urllib.request

    from ovdet.util.progress import progress

    dest = weights_dir() / spec.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{spec.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest, received, expected = hashlib.sha256(), 0, None
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(spec.url, headers={"User-Agent": "ovdet"})
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
                    length = response.headers.get("Content-Length")
                    expected = int(length) if length else None
                    with progress(total=expected, unit="B", unit_scale=True,
                                  desc=f"Downloading {spec.filename}") as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _not_found(what, spec.filename, searched, f"downloading {spec.url} failed: {exc}",
                                 spec.url) from exc
        if expected is not None and received != expected:
            raise _not_found(what, spec.filename, searched,
                             f"download of {spec.url} stopped after {received} of {expected} bytes", spec.url)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise WeightsCorruptError(
                f"The file downloaded from {spec.url} has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
                f"it was discarded. Try again later, or get a good copy of {spec.filename} and run "
                "`ovdet weights import PATH`."
            )
        problem = _checkpoint_problem(tmp)
        if problem:
            raise WeightsCorruptError(
                f"The file downloaded from {spec.url} cannot be used as model weights ({problem}); it was "
                f"discarded. Get a good copy of {spec.filename} and run `ovdet weights import PATH`."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def lookup(name: str) -> ModelSpec | None:
    """The registry entry for a name (any case, with or without ".pt"), or None."""
    key = name.strip().lower()
    key = key[:-3] if key.endswith(".pt") else key
    if key in _TEXT_ALIASES:
        key = DEFAULT_TEXT_MODEL
    return REGISTRY.get(key)


def _resolve_demo() -> Path:
    if not DEMO_FILE.is_file():
        raise WeightsNotFoundError(
            f"The demo detector {DEMO_FILE} is missing from this ovdet installation. Reinstall ovdet "
            "(pip install -e .) or pass a detector file or name instead, e.g. yolov8s-worldv2."
        )
    return check_checkpoint(DEMO_FILE)


def resolve_detector(name_or_path: str | Path, download: bool = True) -> Path:
    """Local .pt file for a detector name or path: the path itself, a cache hit, the demo asset, or a download.

    Searches the ovdet weights dir, ultralytics' weights dir and the current dir; downloads only when
    `download` is true and ovdet is not offline. Yaml configs are not handled here.
    """
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return path if path.suffix == ".safetensors" else check_checkpoint(path)  # a pair is checked on load
    if isinstance(name_or_path, Path) or "/" in text or _looks_like_path(text):
        raise WeightsNotFoundError(
            f"Detector weights file {path} does not exist. Check the path, or pass a model name "
            f"such as {', '.join(known_names('detector')[:3])} (see `ovdet weights list`)."
        )
    spec = lookup(text)
    if spec is not None and spec.kind != "detector":
        raise UnknownModelError(f"'{text}' is a {spec.kind} model, not a detector. "
                                f"Known detectors: {', '.join(known_names('detector'))}.")
    if spec is not None and spec.name == "demo":
        return _resolve_demo()
    filename = spec.filename if spec else (text if Path(text).suffix else f"{text}.pt")
    dirs = _detector_dirs()
    found = _find_file(filename, dirs)
    if found is not None:
        return verify_published(check_checkpoint(found), spec) if spec else check_checkpoint(found)
    if spec is None:
        raise UnknownModelError(
            f"Unknown detector '{text}': it is neither an existing file nor a known model name. Known names: "
            f"{', '.join(known_names('detector'))}. Use an ultralytics yaml config for random weights, or "
            "`ovdet weights import PATH --name NAME` to register your own file."
        )
    what = "Detector file"
    if is_offline():
        raise _not_found(what, filename, dirs, "offline: OVDET_OFFLINE/HF_HUB_OFFLINE is set, so nothing was "
                         "downloaded", spec.url)
    if not download:
        raise _not_found(what, filename, dirs, "download not requested; "
                         f"`ovdet weights path {spec.name} --download` fetches it", spec.url)
    return _download(spec, dirs, what)


def resolve_segmenter(name: str, download: bool = True) -> Path:
    """Local .pt file of a SAM-family segmenter ("mobile_sam", "sam2.1_t", ...): a cache hit or a download (only
    when `download` and not offline); searched where detector files are."""
    spec = lookup(name)
    if spec is None or spec.kind != "segmenter":
        raise UnknownModelError(f"'{name}' is not a segmenter; known ones: {', '.join(known_names('segmenter'))}.")
    dirs = _detector_dirs()
    found = _find_file(spec.filename, dirs)
    if found is not None:
        return check_checkpoint(found)
    what = "Segmenter weights file"
    if is_offline():
        raise _not_found(what, spec.filename, dirs, "offline: OVDET_OFFLINE/HF_HUB_OFFLINE is set, so nothing was "
                         "downloaded", spec.url)
    if not download:
        raise _not_found(what, spec.filename, dirs, "download not requested; "
                         f"`ovdet weights path {spec.name} --download` fetches it", spec.url)
    return _download(spec, dirs, what)


def _find_local_text() -> Path | None:
    spec = REGISTRY[DEFAULT_TEXT_MODEL]
    found = _find_file(spec.filename, _text_dirs())
    return found if found is not None else _hf_snapshot(spec.hf_id)


def resolve_text_model(name_or_path: str | Path | None = None, download: bool = True) -> str | Path:
    """Source for the CLIP text tower: a local file or folder, a cached HF snapshot folder, an HF id, or a download.

    None or "clip-vit-b32" means OpenAI CLIP ViT-B/32: a local ViT-B-32.pt, else a cached
    openai/clip-vit-base-patch32 snapshot, else ViT-B-32.pt downloaded (only when online and `download`).
    Any other string is a Hugging Face id, returned as is when online.
    """
    text = DEFAULT_TEXT_MODEL if name_or_path is None else str(name_or_path).strip()
    path = Path(text).expanduser()
    if path.exists():
        return check_checkpoint(path) if path.is_file() and path.suffix == ".pt" else path
    spec = None if isinstance(name_or_path, Path) else lookup(text)
    if spec is None and (isinstance(name_or_path, Path) or _looks_like_path(text) or path.suffix in {".pt", ".pth"}):
        raise WeightsNotFoundError(f"Text model file or folder {path} does not exist. Check the path, or "
                                   f"pass None for the default CLIP ViT-B/32 ({CLIP_VIT_B32_HF_ID}).")
    if spec is not None and spec.kind != "text":
        raise UnknownModelError(f"'{text}' is a {spec.kind}, not a text model; the default is {DEFAULT_TEXT_MODEL}.")
    offline = is_offline()
    if spec is not None:
        dirs = _text_dirs()
        found = _find_local_text()
        if found is not None:
            return verify_published(check_checkpoint(found), spec) if found.is_file() else found
        searched = [*dirs, _hf_cache_dir() / f"models--{spec.hf_id.replace('/', '--')}"]
        what = "CLIP text tower file"
        if offline:
            raise _not_found(what, spec.filename, searched, "offline: OVDET_OFFLINE/HF_HUB_OFFLINE is set, so "
                             "nothing was downloaded", spec.url)
        if not download:
            raise _not_found(what, spec.filename, searched, "download not requested; "
                             f"`ovdet weights path {spec.name} --download` fetches it", spec.url)
        return _download(spec, searched, what)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise UnknownModelError(f"Text model '{text}' is not an existing file or folder, a known name "
                                f"({DEFAULT_TEXT_MODEL}) or a valid Hugging Face id: {exc}") from exc
    snapshot = _hf_snapshot(text)
    if snapshot is not None:
        return snapshot
    if offline or not download:
        reason = "offline: OVDET_OFFLINE/HF_HUB_OFFLINE is set" if offline else "download not requested"
        raise WeightsNotFoundError(
            f"Hugging Face model '{text}' is not in the local cache {_hf_cache_dir()} ({reason}). Download it "
            "on a machine with network access (huggingface-cli download ID) and copy the folder here, then "
            "pass the folder path as the text model."
        )
    return text


def import_weights(path: str | Path, name: str | None = None, trust_weights: bool = False) -> Path:
    """Validate a weights file and copy it into weights_dir() (atomically) so it resolves by name.

    The file is read as ovdet will read it (no code from it runs unless `trust_weights`) and must be a YOLO-World
    checkpoint, a CLIP text tower or a SAM-family segmenter; anything else is refused before it is copied.
    """
    from ovdet.weights.checkpoint import identify_weights

    src = Path(path).expanduser()
    if not src.is_file():
        raise WeightsNotFoundError(f"Cannot import {src}: no such file. Pass the path of a downloaded .pt file.")
    check_checkpoint(src)
    filename = src.name if name is None else name.strip()
    if not filename or Path(filename).name != filename or filename in {".", ".."}:
        raise ModelError(f"Import name '{name}' must be a plain file name such as yolov8s-worldv2, without folders.")
    if not Path(filename).suffix:
        filename += ".pt"
    spec = lookup(filename)
    if spec is not None and spec.name == "demo":
        raise ModelError("'demo' is the detector shipped inside ovdet; import under another --name.")
    if spec is not None and spec.sha256 and filename == spec.filename and cached_sha256(src) != spec.sha256:
        raise WeightsCorruptError(
            f"{src} is not the published {spec.filename} (sha256 differs from {spec.sha256}). Download a good "
            f"copy from {spec.url}, or import this file under another --name."
        )
    kind = identify_weights(src, trust=trust_weights)  # before copying: a file that would run code stays out
    if spec is not None and spec.kind != kind:
        words = {"text": "CLIP text tower", "segmenter": "SAM segmenter"}.get(kind, "detector")
        raise ModelError(f"{src} is a {words}, but {spec.name} names "
                         f"a {spec.kind}: import it under another --name.")
    dest = weights_dir() / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.samefile(src):
        return dest
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{filename}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def list_models() -> list[ModelRow]:
    """Every known model plus files imported under other names, with the local path when present (no network)."""
    rows = []
    for spec in REGISTRY.values():
        if spec.name == "demo":
            local = DEMO_FILE if DEMO_FILE.is_file() else None
        elif spec.kind == "text":
            local = _find_local_text()
        else:
            local = _find_file(spec.filename, _detector_dirs())
        rows.append(ModelRow(spec.name, spec.kind, local))
    known_files = {spec.filename for spec in REGISTRY.values()}
    if weights_dir().is_dir():
        for extra in sorted(weights_dir().glob("*.pt")):
            if extra.name not in known_files:
                rows.append(ModelRow(extra.stem, "imported", extra))
    return rows
