"""The try-it page served at `/`: one self-contained HTML file (inline CSS and JS, package assets) and the
Content-Security-Policy that lets it talk to this server only."""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources

__all__ = ["page"]


def _asset(name: str) -> str:
    text = resources.files("ovdet.service").joinpath("assets", name).read_text(encoding="utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


@lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """(the page's HTML, its Content-Security-Policy header).

    The policy allows the page's own inline script and style (by hash), requests to this server only
    (connect-src 'self'), images and frames from the user's file or camera (blob:, mediastream:), and nothing else:
    no other script or origin, no frame, form target or plugin; Trusted Types make any string written as markup
    (innerHTML and the like) throw, so a class name from the server can only ever be text.
    """
    style, script = _asset("page.css"), _asset("page.js")
    for text, tag in ((style, "style"), (script, "script")):
        if f"</{tag}" in text.lower():
            raise RuntimeError(f"ovdet/service/assets/page.* contains </{tag}, which would end its inline element")
    html = _asset("page.html").replace("/*STYLE*/", style, 1).replace("/*SCRIPT*/", script, 1)
    policy = "; ".join([
        "default-src 'none'", f"script-src {_sha256(script)}", f"style-src {_sha256(style)}", "connect-src 'self'",
        "img-src 'self' blob: data:", "media-src blob: mediastream:", "base-uri 'none'", "form-action 'none'",
        "frame-ancestors 'none'", "require-trusted-types-for 'script'", "trusted-types 'none'"])
    return html, policy
