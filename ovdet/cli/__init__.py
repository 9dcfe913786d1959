"""The `ovdet` command: each subcommand lives in its own module with `add_parser(sub)` and `run(args)`."""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
import warnings
from typing import NoReturn, TextIO

from ovdet.util.display import shown
from ovdet.errors import OVDetError, OVDetWarning
from ovdet.version import package_version

# Subcommand modules under ovdet.cli, in the order `ovdet --help` lists them.
COMMANDS = ("detect", "weights", "video", "webcam", "annotate", "report", "relabel", "train", "eval", "synth",
            "classes", "cache", "export", "serve")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False), the help states it, or the
    option is a flag (store_true / store_false: its help says what giving it does, and "--no-x ... (default: True)"
    would read as if it were on). 0 and 0.0 are real defaults and are shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.default is None or action.default is False or flag or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with suggestions: a misspelt option or command gets "did you mean ...?", and an error in a
    subcommand shows that subcommand's usage. Subparsers are made of this class too (argparse copies the type)."""

    _given: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _known_options(self) -> list[str]:
        return [name for name in self._option_string_actions if name.startswith("--")]

    @staticmethod
    def suggest(word: str, choices: list[str]) -> str | None:
        """The choice closest to `word` (an option or a command name), or None when none is close."""
        bare = {c.lstrip("-"): c for c in choices}
        close = difflib.get_close_matches(word.split("=", 1)[0].lstrip("-"), list(bare), n=1, cutoff=0.6)
        return bare[close[0]] if close else None

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        options = self._known_options()
        unknown = [w.split("=", 1)[0] for w in self._given if w.startswith("--")]
        unknown = [w for w in unknown if w != "--" and not any(o.startswith(w) for o in options)]  # abbreviations pass
        if message.startswith(("unrecognized arguments:", "the following arguments are required:")):
            for word in unknown:
                close = self.suggest(word, options)
                message += f"; {word} is not an option of `{self.prog}`" + (f": did you mean {close}?" if close else "")
        elif (bad := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)) is not None:
            close = self.suggest(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)))
            message += f": did you mean {close!r}?" if close else ""
        super().error(message)


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
    parser = Parser(
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, so that its usage is shown
        command = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        command._given = list(extra)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
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
