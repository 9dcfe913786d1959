"""Assemble report.html: the template with the style, the script and the run's data inlined."""

from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path

from ovdet.report.data import build_data
from ovdet.report.thumbs import make_thumbnails
from ovdet.runfolder import load_run
from ovdet.runlock import lock_output
from ovdet.sinks import atomic_write

__all__ = ["REPORT_NAME", "write_report"]

REPORT_NAME = "report.html"
THUMBS = "thumbs"


def _asset(name: str) -> str:
    return resources.files("ovdet.report").joinpath("assets", name).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The HTML page for a report document (see ovdet.report.data)."""
    # "<" escaped inside JSON so no string in the data (a file or class name) can close the script element.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = f"ovdet {data['kind']} report: {Path(data['run']).name}"
    return (_asset("report.html")
            .replace("/*STYLE*/", _asset("report.css"))
            .replace("/*SCRIPT*/", _asset("report.js"))
            .replace("{{TITLE}}", html.escape(title))
            .replace("/*DATA*/", payload))


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
            thumb_errors = make_thumbnails(thumbs, ((r["key"], r["path"]) for r in run.records()), quiet=quiet)
        out = run.path / REPORT_NAME
        atomic_write(out, render(build_data(run, thumbs, thumb_errors)))
    return out
