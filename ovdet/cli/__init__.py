"""The `ovdet` command: each subcommand lives in its own module with `add_parser(sub)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import TextIO

from ovdet.util.display import shown
from ovdet.errors import OVDetError, OVDetWarning
from ovdet.version import package_version

# Subcommand modules under ovdet.cli, in the order `ovdet --help` lists them.
COMMANDS = ("detect", "weights", "video", "webcam", "annotate", "report", "relabel", "train", "eval", "synth",
            "classes", "cache", "export")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False) or the help states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _VersionAction(argparse._VersionAction):
    """argparse's --version, with the version looked up only when asked for (not on every start)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        self.version = f"%(prog)s {package_version()}"
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per command module.

    Command modules import only light modules at their top (heavy ones inside `run`), so that building this
    parser, and `ovdet --help`, imports no torch, ultralytics, transformers or OpenCV.
    """
    parser = argparse.ArgumentParser(
        prog="ovdet",
        description="Open-vocabulary object detection: name what to find, get boxes.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print ovdet's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"ovdet.cli.{name}")
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """ovdet's own warnings as one plain line (others as Python shows them)."""
    if issubclass(category, OVDetWarning):
        print(f"ovdet: warning: {_lines_shown(message)}", file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=file or sys.stderr, end="")


def _lines_shown(message: object) -> str:
    """A message that may quote file or class names, control characters escaped (its own line breaks kept)."""
    return "\n".join(shown(line) for line in str(message).split("\n"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the default display afterwards (main may run in-process)
            warnings.showwarning = _show_warning
            return int(args._run(args) or 0)
    except OVDetError as exc:
        print(f"ovdet: error: {_lines_shown(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovdet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
