"""Assemble report.html: the template with the style, the script and the run's data inlined."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
from importlib import resources
from pathlib import Path

from ovdet.report.data import build_data
from ovdet.report.thumbs import make_thumbnails
from ovdet.runs.folder import load_run
from ovdet.runs.lock import lock_output
from ovdet.util.safeio import atomic_write

__all__ = ["REPORT_NAME", "write_report"]

REPORT_NAME = "report.html"
THUMBS = "thumbs"


def _asset(name: str) -> str:
    return resources.files("ovdet.report").joinpath("assets", name).read_text(encoding="utf-8")


# Placeholders of report.html, each filled once in a single pass, so no inserted text is searched again.
_SLOTS = re.compile(r"\{\{TITLE\}\}|/\*(?:CSP|STYLE|SCRIPT|DATA)\*/")
# Runs of whitespace and control characters (line breaks included): one space in the page's one-line title.
_BREAKS = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _inline(name: str, tag: str) -> str:
    """An asset as it is inlined: LF line ends (what the browser hashes after parsing) and no closing tag inside."""
    text = _asset(name).replace("\r\n", "\n").replace("\r", "\n")
    if f"</{tag}" in text.lower():
        raise RuntimeError(f"ovdet/report/assets/{name} contains </{tag}, which would end its inline element")
    return text


def _sha256(text: str) -> str:
    """The CSP source expression allowing exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _policy(script: str, style: str) -> str:
    """The page's Content-Security-Policy: its own inline script and style (by hash); images: local and data:.

    Nothing else: no other script, no inline handler or style attribute, no fetch, frame, object, font, base or
    form target, and Trusted Types make a string written to innerHTML and the like throw. A run folder's text
    that ever slipped into the markup could then not run, nor load or send anything.
    """
    return "; ".join([
        "default-src 'none'", f"script-src {_sha256(script)}", f"style-src {_sha256(style)}",
        # file: too: a report opened from disk has an opaque origin, and only some browsers let 'self' match
        # the thumbnails and images beside it then (Chromium does); images cannot run or send anything
        "img-src 'self' data: file:", "base-uri 'none'", "form-action 'none'",
        "require-trusted-types-for 'script'", "trusted-types 'none'"])


def render(data: dict) -> str:
    """The HTML page for a report document (see ovdet.report.data).

    Everything from the run folder is data: the JSON block (which the script draws with textContent, never as
    markup) and the HTML-escaped one-line title.
    """
    # "<" escaped inside JSON so no string in the data (a file or class name) can close the script element;
    # U+2028/2029 escaped too, so the block is also valid JavaScript source for any tool that reads it as such.
    payload = (json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
               .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    title = _BREAKS.sub(" ", f"ovdet {data['kind']} report: {Path(data['run']).name}").strip()
    style, script = _inline("report.css", "style"), _inline("report.js", "script")
    slots = {"{{TITLE}}": html.escape(title), "/*CSP*/": html.escape(_policy(script, style)), "/*STYLE*/": style,
             "/*SCRIPT*/": script, "/*DATA*/": payload}
    return _SLOTS.sub(lambda m: slots[m.group(0)], _asset("report.html"))


def write_report(run_dir: str | os.PathLike, thumbnails: bool = True, quiet: bool = False) -> Path:
    """Write RUN_DIR/report.html for an annotate, relabel or eval run folder; returns its path.

    Thumbnails go to RUN_DIR/thumbs/ once (later reports reuse them); with `thumbnails=False` the gallery
    shows the full images. The folder is locked while the report is written.
    """
    run = load_run(run_dir)
    with lock_output(run.path):
        thumb_errors: dict[str, str] = {}
        thumbs = run.path / THUMBS if thumbnails else None
        if thumbs is not None:
            # only the run's own source images are read (image_problem); thumbs/ is opened link-free below the run
            thumb_errors = make_thumbnails(thumbs, ((r["key"], r["path"]) for r in run.records()), quiet=quiet,
                                           check=run.image_problem, root=run.path)
        out = run.path / REPORT_NAME
        atomic_write(out, render(build_data(run, thumbs, thumb_errors)), root=run.path)
    return out
