"""Every `ovdet ... --help`, option by option: a real default is shown as it is, and a flag says what it does."""

from __future__ import annotations

import argparse
import re

import pytest

from ovdet.cli import build_parser

# flags take no value; a help that reads "whether ...", or talks of True/False, describes a variable, not the flag
_NOT_A_FLAG_PHRASE = re.compile(r"(?i:^(whether|if (true|set|given)|enable or disable|set to|toggle)\b)|\b(True|False)\b")


def _parsers(parser: argparse.ArgumentParser, name: str = "ovdet"):
    """(command words, parser) of `parser` and of every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {word}")


def _options():
    """(command words, option, action) of every option and argument shown by some `--help`."""
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            yield name, "/".join(action.option_strings) or action.dest, action, parser


def _shown(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help of one option exactly as `--help` prints it, on one line."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


OPTIONS = list(_options())


def test_the_walk_sees_every_command():
    commands = {name.split()[1] for name, *_ in OPTIONS if len(name.split()) > 1}
    assert commands >= {"detect", "weights", "video", "webcam", "annotate", "report", "relabel", "train", "eval",
                        "synth", "classes", "cache", "export"}
    assert len(OPTIONS) > 150


@pytest.mark.parametrize("name", sorted({name for name, *_ in OPTIONS}))
def test_every_help_page_renders(name):
    parser = dict(_parsers(build_parser()))[name]
    text = parser.format_help()
    assert text.startswith("usage:") and "%(" not in text


@pytest.mark.parametrize("name,option,action,parser",
                         [o for o in OPTIONS if o[2].nargs != 0 and o[2].default is not None
                          and o[2].default is not False and o[2].default != argparse.SUPPRESS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_an_option_with_a_default_shows_that_default(name, option, action, parser):
    """A value that the command uses when the option is not given is shown as it is: "(default: 0)" for 0 too."""
    text = _shown(parser, action)
    default = action.default
    shown = str(default)  # as argparse's %(default)s writes it
    assert f"(default: {shown})" in text or ("default" in (action.help or "") and shown in text), \
        f"`{name} --help` does not show {option}'s default {default!r}: {text!r}"


@pytest.mark.parametrize("name,option,action,parser", [o for o in OPTIONS if o[2].nargs == 0],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_flag_says_what_it_does(name, option, action, parser):
    """A flag's help is what giving it does ("skip ...", "print ...", "also write ..."), with no "(default: True)"
    that reads as if the flag were already on."""
    text = _shown(parser, action)
    assert action.help and not _NOT_A_FLAG_PHRASE.search(action.help), f"{name} {option}: {action.help!r}"
    if isinstance(action, argparse.BooleanOptionalAction):
        # --x/--no-x: the help says what --x does, and may say which of the two is in effect when neither is given
        assert "(default: None)" not in text, text
        return
    assert "(default:" not in text, f"`{name} --help` shows a default for the flag {option}: {text!r}"
