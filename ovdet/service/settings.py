"""The service's settings (limits, auth, batching, where images may come from) and its one error type."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ovdet.errors import OVDetError

__all__ = ["LOOPBACK_HOSTS", "ServeConfigError", "ServeSettings", "ServiceError", "TOKEN_ENV", "check_bind",
           "is_loopback"]

TOKEN_ENV = "OVDET_SERVE_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServiceError(OVDetError):
    """A request the service refuses: `status` is the HTTP status, `code` a short machine-readable name, the message
    says what to send instead; `headers` go with the answer (e.g. Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, dict(headers or {})


class ServeConfigError(OVDetError, ValueError):
    """Server options that cannot work or are unsafe (e.g. a public address without a token)."""


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token: anyone who reaches it could use the detector."""
    if token is None and not is_loopback(host):
        raise ServeConfigError(f"refusing to listen on {host} without a token: anyone who can reach it could run "
                               f"the detector and read local files. Give --token TOKEN (or set ${TOKEN_ENV}), or "
                               "bind --host 127.0.0.1")


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback name or address (a server bound there is reachable from this machine only)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeSettings:
    """How the service runs. Limits answer 413/400/429-style JSON errors, never a crash."""

    token: str | None = None  # bearer token every /v1, /predict and /setup request must carry; None: no auth
    max_body_bytes: int = 32 << 20  # one request body
    max_pixels: int = 40_000_000  # one image, read from its header before it is decoded
    max_images: int = 16  # images in one request (tasks in one /predict)
    max_classes: int | None = None  # classes in one request; None: ovdet.text.limits' cap (OVDET_MAX_CLASSES)
    max_batch: int = 8  # images in one forward pass
    max_wait_ms: float = 5.0  # how long the worker waits for more requests to fill a batch
    max_queue: int = 64  # requests waiting for the worker; more answer 503 with Retry-After
    allow_urls: bool = False  # fetch http(s) images (detect and Label Studio tasks)
    url_timeout_s: float = 10.0
    data_root: Path | None = None  # local image paths (Label Studio tasks) are read only under this folder
    # Label Studio's LOCAL_FILES_DOCUMENT_ROOT: /data/local-files/?d=PATH tasks are read under it (None: data_root)
    local_files_root: Path | None = None
    persist_vocabularies: bool = True  # vocabularies kept under $OVDET_HOME/vocabularies as JSON
    model_version: str = "ovdet"  # what /setup and /predict report to Label Studio

    @classmethod
    def token_from_env(cls) -> str | None:
        """$OVDET_SERVE_TOKEN, or None when unset or blank."""
        return os.environ.get(TOKEN_ENV, "").strip() or None
