"""Weights resolution: local files, caches, offline errors, downloads from a local HTTP server, the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import ovdet.cli
from ovdet.weights import registry as weights
from ovdet.errors import ModelError, UnknownModelError, WeightsCorruptError, WeightsNotFoundError

IMPORT_HINT = "ovdet weights import PATH"


def checkpoint_bytes(seed: int = 0) -> bytes:
    """A small valid torch checkpoint (torch.save writes a zip archive)."""
    buf = io.BytesIO()
    torch.save({"model": torch.arange(8) + seed, "train_args": {}}, buf)
    return buf.getvalue()


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(checkpoint_bytes(seed))
    return path


@pytest.fixture
def connections(monkeypatch):
    """Every socket connect/DNS lookup is recorded; anything not loopback fails the test."""
    attempts: list = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def loopback(host) -> bool:
        return isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1"))

    def connect(sock, address):
        attempts.append(address)
        if not loopback(address[0] if isinstance(address, tuple) else address):
            raise AssertionError(f"test tried to reach the network: {address!r}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        if not loopback(host):
            raise AssertionError(f"test tried to resolve a network name: {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


@pytest.fixture
def env(tmp_path, monkeypatch, connections):
    """Isolated OVDET_HOME, HOME, HF cache, ultralytics weights dir and cwd; offline by default."""
    monkeypatch.setenv("OVDET_HOME", str(tmp_path / "ovdet"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OVDET_OFFLINE", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights, "_ultralytics_weights_dir", lambda: tmp_path / "ultralytics")
    monkeypatch.setattr(weights, "_hf_cache_dir", lambda: tmp_path / "hf")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


@pytest.fixture
def online(monkeypatch, env):
    monkeypatch.delenv("OVDET_OFFLINE")
    return env


class Server:
    """A threaded HTTP server on 127.0.0.1 serving `routes` (path -> bytes); everything else is 404."""

    def __init__(self):
        self.routes: dict[str, bytes] = {}
        self.lie_length: dict[str, int] = {}  # path -> extra bytes announced but never sent
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + server.lie_length.get(self.path, 0)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


def serve_as(monkeypatch, server: Server, name: str, body: bytes | None, sha256: str | None = None) -> None:
    """Point registry entry `name` at the local server (404 when body is None)."""
    path = f"/assets/{weights.REGISTRY[name].filename}"
    if body is not None:
        server.routes[path] = body
    spec = dataclasses.replace(weights.REGISTRY[name], url=server.url(path), sha256=sha256)
    monkeypatch.setitem(weights.REGISTRY, name, spec)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --- detectors -----------------------------------------------------------------------------------------------------


def test_registry_urls_follow_ultralytics_release():
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, GITHUB_ASSETS_REPO

    detectors = [weights.REGISTRY[n] for n in weights.known_names("detector") if n != "demo"]
    assert len(detectors) == 8
    for spec in detectors:
        assert spec.filename in GITHUB_ASSETS_NAMES
        assert spec.url == f"https://github.com/{GITHUB_ASSETS_REPO}/releases/download/v8.4.0/{spec.filename}"
    clip = weights.REGISTRY["clip-vit-b32"]
    assert clip.sha256 in clip.url and clip.url.endswith("/ViT-B-32.pt")


def test_local_file_path(env):
    path = write_checkpoint(env / "models" / "mine.pt")
    assert weights.resolve_detector(path) == path
    assert weights.resolve_detector(str(path)) == path


def test_missing_path_is_not_found(env):
    with pytest.raises(WeightsNotFoundError, match="nope.pt"):
        weights.resolve_detector(env / "nope.pt")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        weights.resolve_detector("./models/nope.pt")


@pytest.mark.parametrize("name", ["yolov8s-worldv2", "yolov8s-worldv2.pt", "YOLOv8s-WorldV2"])
def test_cache_hit_by_name(env, connections, name):
    cached = write_checkpoint(weights.weights_dir() / "yolov8s-worldv2.pt")
    assert weights.resolve_detector(name) == cached
    assert connections == []


def test_ultralytics_dir_and_cwd_are_searched(env):
    in_ultralytics = write_checkpoint(env / "ultralytics" / "yolov8m-world.pt")
    in_cwd = write_checkpoint(env / "cwd" / "yolov8l-world.pt")
    assert weights.resolve_detector("yolov8m-world") == in_ultralytics
    assert weights.resolve_detector("yolov8l-world").resolve() == in_cwd.resolve()


def test_ovdet_cache_wins_over_ultralytics_dir(env):
    write_checkpoint(env / "ultralytics" / "yolov8x-worldv2.pt", seed=1)
    ours = write_checkpoint(weights.weights_dir() / "yolov8x-worldv2.pt", seed=2)
    assert weights.resolve_detector("yolov8x-worldv2") == ours


@pytest.mark.parametrize("var,value", [("OVDET_OFFLINE", "1"), ("OVDET_OFFLINE", "true"), ("HF_HUB_OFFLINE", "1")])
def test_offline_miss_is_clear_and_makes_no_network_call(env, monkeypatch, server, connections, var, value):
    monkeypatch.delenv("OVDET_OFFLINE")
    monkeypatch.setenv(var, value)
    serve_as(monkeypatch, server, "yolov8s-worldv2", checkpoint_bytes())
    assert weights.is_offline()
    with pytest.raises(WeightsNotFoundError) as info:
        weights.resolve_detector("yolov8s-worldv2")
    message = str(info.value)
    assert "yolov8s-worldv2.pt" in message and "offline" in message and IMPORT_HINT in message
    for folder in (weights.weights_dir(), env / "ultralytics", env / "cwd"):
        assert str(folder) in message
    assert server.requests == [] and connections == []
    assert files_in(weights.weights_dir()) == []


@pytest.mark.parametrize("value,expected", [("0", False), ("", False), ("no", False), ("YES", True), ("on", True)])
def test_is_offline_values(env, monkeypatch, value, expected):
    monkeypatch.setenv("OVDET_OFFLINE", value)
    assert weights.is_offline() is expected


def test_unknown_name_lists_known_names(env):
    with pytest.raises(UnknownModelError) as info:
        weights.resolve_detector("yolov9-galaxy")
    assert "yolov8s-worldv2" in str(info.value) and "yolov8x-world" in str(info.value)
    with pytest.raises(UnknownModelError, match="text model"):
        weights.resolve_detector("clip-vit-b32")


def test_download_lands_in_cache_and_resolves_offline_later(online, monkeypatch, server, connections):
    body = checkpoint_bytes()
    serve_as(monkeypatch, server, "yolov8s-worldv2", body)
    path = weights.resolve_detector("yolov8s-worldv2")
    assert path == weights.weights_dir() / "yolov8s-worldv2.pt"
    assert path.read_bytes() == body
    assert files_in(weights.weights_dir()) == ["yolov8s-worldv2.pt"]  # no temp file left behind
    assert server.requests == ["/assets/yolov8s-worldv2.pt"]
    sockets = [a for a in connections if isinstance(a, tuple)]
    assert sockets and all(a[0] == "127.0.0.1" for a in sockets)  # the guard saw the (loopback) download
    server.close()
    monkeypatch.setenv("OVDET_OFFLINE", "1")
    assert weights.resolve_detector("yolov8s-worldv2.pt") == path


def test_download_checks_sha256(online, monkeypatch, server):
    body = checkpoint_bytes()
    serve_as(monkeypatch, server, "yolov8m-worldv2", body, sha256=hashlib.sha256(body).hexdigest())
    assert weights.resolve_detector("yolov8m-worldv2").read_bytes() == body


def test_sha256_mismatch_leaves_nothing(online, monkeypatch, server):
    serve_as(monkeypatch, server, "yolov8s-worldv2", checkpoint_bytes(), sha256="0" * 64)
    with pytest.raises(WeightsCorruptError, match="sha256"):
        weights.resolve_detector("yolov8s-worldv2")
    assert files_in(weights.weights_dir()) == []


def test_download_of_truncated_file_is_rejected(online, monkeypatch, server):
    serve_as(monkeypatch, server, "yolov8s-worldv2", checkpoint_bytes()[:700])
    with pytest.raises(WeightsCorruptError, match="truncated"):
        weights.resolve_detector("yolov8s-worldv2")
    assert files_in(weights.weights_dir()) == []


def test_connection_cut_short_is_not_found(online, monkeypatch, server):
    serve_as(monkeypatch, server, "yolov8s-worldv2", checkpoint_bytes())
    server.lie_length["/assets/yolov8s-worldv2.pt"] = 5000
    with pytest.raises(WeightsNotFoundError) as info:
        weights.resolve_detector("yolov8s-worldv2")
    assert IMPORT_HINT in str(info.value)
    assert files_in(weights.weights_dir()) == []


def test_server_404_is_not_found(online, monkeypatch, server):
    serve_as(monkeypatch, server, "yolov8l-worldv2", None)
    with pytest.raises(WeightsNotFoundError) as info:
        weights.resolve_detector("yolov8l-worldv2")
    message = str(info.value)
    assert "404" in message and "yolov8l-worldv2.pt" in message and IMPORT_HINT in message
    assert server.requests == ["/assets/yolov8l-worldv2.pt"]
    assert files_in(weights.weights_dir()) == []


def test_no_download_unless_asked(online, monkeypatch, server):
    serve_as(monkeypatch, server, "yolov8s-worldv2", checkpoint_bytes())
    with pytest.raises(WeightsNotFoundError, match="--download"):
        weights.resolve_detector("yolov8s-worldv2", download=False)
    assert server.requests == []


def test_truncated_cached_file_is_corrupt(env):
    cached = weights.weights_dir() / "yolov8s-worldv2.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(checkpoint_bytes()[:900])
    with pytest.raises(WeightsCorruptError) as info:
        weights.resolve_detector("yolov8s-worldv2")
    assert str(cached) in str(info.value) and "Delete" in str(info.value)


def test_check_checkpoint_rejects_wrong_files(env):
    good = write_checkpoint(env / "good.pt")
    assert weights.check_checkpoint(good) == good
    text = env / "notes.pt"
    text.write_text("not a model")
    empty = env / "empty.pt"
    empty.write_bytes(b"")
    other_zip = env / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    for bad, reason in [(text, "zip"), (empty, "empty"), (other_zip, "data.pkl")]:
        with pytest.raises(WeightsCorruptError, match=reason):
            weights.check_checkpoint(bad)


def test_demo_resolves_to_package_asset(env, monkeypatch):
    missing = env / "assets" / "demo-world.pt"
    monkeypatch.setattr(weights, "DEMO_FILE", missing)
    with pytest.raises(WeightsNotFoundError, match="demo"):
        weights.resolve_detector("demo")
    write_checkpoint(missing)
    assert weights.resolve_detector("demo") == missing
    assert weights.resolve_detector("demo.pt") == missing


# --- import --------------------------------------------------------------------------------------------------------


def write_world_checkpoint(path: Path, seed: int = 0) -> Path:
    """A real (random-weight) YOLO-World checkpoint: `weights import` refuses anything else."""
    from conftest import random_world_model, save_world_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    save_world_checkpoint(random_world_model(seed=seed), path)
    return path


def test_import_then_resolve_by_name(env):
    src = write_world_checkpoint(env / "downloads" / "yolov8s-worldv2.pt")
    dest = weights.import_weights(src)
    assert dest == weights.weights_dir() / "yolov8s-worldv2.pt" and dest.read_bytes() == src.read_bytes()
    assert weights.resolve_detector("yolov8s-worldv2") == dest
    custom = weights.import_weights(write_world_checkpoint(env / "downloads" / "run7-best.pt", seed=3),
                                    name="street")
    assert custom == weights.weights_dir() / "street.pt"
    assert weights.resolve_detector("street") == custom
    assert files_in(weights.weights_dir()) == ["street.pt", "yolov8s-worldv2.pt"]


def test_import_rejects_bad_input(env):
    bad = env / "bad.pt"
    bad.write_bytes(checkpoint_bytes()[:500])
    with pytest.raises(WeightsCorruptError, match="bad.pt"):
        weights.import_weights(bad)
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        weights.import_weights(env / "absent.pt")
    with pytest.raises(ModelError, match="plain file name"):
        weights.import_weights(write_world_checkpoint(env / "ok.pt"), name="sub/dir")
    with pytest.raises(WeightsCorruptError, match="sha256"):
        weights.import_weights(write_checkpoint(env / "ViT-B-32.pt"))  # not the published CLIP file
    assert files_in(weights.weights_dir()) == []


# --- text tower ----------------------------------------------------------------------------------------------------


def fake_hf_snapshot(hf_root: Path, repo_id: str) -> Path:
    repo = hf_root / f"models--{repo_id.replace('/', '--')}"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"\0" * 16)
    return snapshot


@pytest.mark.parametrize("where", ["ovdet", "clip", "ultralytics"])
def test_default_text_model_finds_local_vit_b32(env, where, clip_stand_in):
    folder = {"ovdet": weights.weights_dir(), "clip": env / "home" / ".cache" / "clip",
              "ultralytics": env / "ultralytics" / "clip"}[where]
    local = write_checkpoint(folder / "ViT-B-32.pt")
    assert weights.resolve_text_model() == local
    assert weights.resolve_text_model("clip-vit-b32") == local
    assert weights.resolve_text_model("ViT-B/32") == local


def test_default_text_model_uses_hf_cache_snapshot(env):
    snapshot = fake_hf_snapshot(env / "hf", "openai/clip-vit-base-patch32")
    assert weights.resolve_text_model() == snapshot


def test_default_text_model_offline_miss(env, connections):
    (env / "hf").mkdir()
    with pytest.raises(WeightsNotFoundError) as info:
        weights.resolve_text_model()
    message = str(info.value)
    assert "ViT-B-32.pt" in message and IMPORT_HINT in message and "offline" in message
    assert str(env / "home" / ".cache" / "clip") in message and "openaipublic" in message
    assert connections == []


def test_default_text_model_download_verifies_sha256(online, monkeypatch, server):
    body = checkpoint_bytes(seed=5)
    serve_as(monkeypatch, server, "clip-vit-b32", body, sha256=hashlib.sha256(body).hexdigest())
    path = weights.resolve_text_model()
    assert path == weights.weights_dir() / "ViT-B-32.pt" and path.read_bytes() == body
    path.unlink()
    serve_as(monkeypatch, server, "clip-vit-b32", body, sha256=weights.CLIP_VIT_B32_SHA256)  # not the real file
    with pytest.raises(WeightsCorruptError, match="sha256"):
        weights.resolve_text_model()
    assert files_in(weights.weights_dir()) == []


def test_text_model_paths_and_hf_ids(env, monkeypatch):
    folder = env / "my-clip"
    folder.mkdir()
    assert weights.resolve_text_model(folder) == folder
    assert weights.resolve_text_model(str(folder)) == folder
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        weights.resolve_text_model(env / "gone.pt")
    with pytest.raises(WeightsNotFoundError, match="laion/tiny-clip"):  # offline and not cached
        weights.resolve_text_model("laion/tiny-clip")
    cached = fake_hf_snapshot(env / "hf", "laion/tiny-clip")
    assert weights.resolve_text_model("laion/tiny-clip") == cached
    monkeypatch.delenv("OVDET_OFFLINE")
    assert weights.resolve_text_model("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    with pytest.raises(UnknownModelError):
        weights.resolve_text_model("not a valid id!")


# --- listing and CLI -----------------------------------------------------------------------------------------------


def test_list_models(env):
    cached = write_checkpoint(weights.weights_dir() / "yolov8s-world.pt")
    extra = write_checkpoint(weights.weights_dir() / "street.pt")
    rows = {row.name: row for row in weights.list_models()}
    assert rows["yolov8s-world"].path == cached and rows["yolov8s-world"].kind == "detector"
    assert rows["yolov8x-worldv2"].path is None
    assert rows["clip-vit-b32"].kind == "text" and rows["clip-vit-b32"].path is None
    assert rows["street"].path == extra
    assert {"demo", "yolov8m-worldv2", "yolov8l-world"} <= set(rows)


@pytest.fixture
def cli(monkeypatch):
    """ovdet.cli.main restricted to the weights command, so other commands' imports do not matter here."""
    assert "weights" in ovdet.cli.COMMANDS
    monkeypatch.setattr(ovdet.cli, "COMMANDS", ("weights",))
    return ovdet.cli.main


def test_cli_list_path_import(env, cli, capsys):
    src = write_world_checkpoint(env / "downloads" / "best.pt")
    assert cli(["weights", "import", str(src), "--name", "yolov8m-worldv2"]) == 0
    out = capsys.readouterr().out
    dest = weights.weights_dir() / "yolov8m-worldv2.pt"
    assert str(dest) in out and dest.read_bytes() == src.read_bytes()

    assert cli(["weights", "path", "yolov8m-worldv2"]) == 0
    assert capsys.readouterr().out.strip() == str(dest)

    assert cli(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "LOCAL"]
    table = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert table["yolov8m-worldv2"] == ["detector", str(dest)]
    assert table["yolov8s-worldv2"] == ["detector", "missing"]
    assert table["clip-vit-b32"] == ["text", "missing"]


def test_cli_path_text_model(env, cli, capsys, clip_stand_in):
    local = write_checkpoint(env / "home" / ".cache" / "clip" / "ViT-B-32.pt")
    assert cli(["weights", "path", "clip-vit-b32"]) == 0
    assert capsys.readouterr().out.strip() == str(local)


def test_cli_errors_are_clear(env, cli, capsys, connections):
    assert cli(["weights", "path", "yolov8s-worldv2"]) == 2
    err = capsys.readouterr().err
    assert "yolov8s-worldv2.pt" in err and IMPORT_HINT in err
    assert cli(["weights", "path", "no-such-model"]) == 2
    assert "Known names" in capsys.readouterr().err
    assert cli(["weights", "import", str(env / "absent.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert connections == []


def test_cli_path_download(online, monkeypatch, server, cli, capsys):
    serve_as(monkeypatch, server, "yolov8s-world", checkpoint_bytes())
    assert cli(["weights", "path", "yolov8s-world"]) == 2  # no download without --download
    assert server.requests == [] and "--download" in capsys.readouterr().err
    assert cli(["weights", "path", "yolov8s-world", "--download"]) == 0
    assert capsys.readouterr().out.strip() == str(weights.weights_dir() / "yolov8s-world.pt")


def test_cli_help_explains_options_without_empty_defaults(cli, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["weights", "import", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--name NAME name to store it under; none keeps the file's own name" in out
    assert "(default: None)" not in out
    with pytest.raises(SystemExit):
        cli(["weights", "path", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--download" in out and "(default: False)" not in out
