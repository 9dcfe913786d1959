"""What the command line says when a user mistypes: the subcommand's own usage, and the option or command meant."""

from __future__ import annotations

import pytest

from ovdet.cli import Parser, main


def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_a_misspelt_option_is_named_with_the_one_meant(capsys):
    err = error_of(["detect", "samples/shapes.jpg", "--clases", "red circle"], capsys)
    assert err.startswith("usage: ovdet detect"), err
    assert "--clases is not an option of `ovdet detect`: did you mean --classes?" in err


def test_an_unknown_option_shows_the_subcommands_usage_and_a_suggestion(capsys):
    err = error_of(["detect", "samples/shapes.jpg", "--classes", "x", "--modle", "demo"], capsys)
    assert err.startswith("usage: ovdet detect"), err  # not the top-level usage
    assert "unrecognized arguments: --modle demo; --modle is not an option of `ovdet detect`: did you mean --model?" \
        in err


def test_an_unknown_option_with_nothing_close_gets_no_guess(capsys):
    err = error_of(["annotate", "in", "--classes", "x", "--out", "o", "--bogus"], capsys)
    assert err.startswith("usage: ovdet annotate"), err
    assert err.rstrip().endswith("--bogus is not an option of `ovdet annotate`"), err


def test_a_misspelt_command_gets_the_command_meant(capsys):
    err = error_of(["detetc", "x.jpg"], capsys)
    assert "invalid choice: 'detetc'" in err and err.rstrip().endswith("did you mean 'detect'?"), err


def test_abbreviations_argparse_accepts_are_not_called_unknown(capsys):
    err = error_of(["annotate", "in", "--mod", "demo", "--classes", "x"], capsys)  # --mod is --model; --out missing
    assert "required: --out" in err and "is not an option" not in err, err


@pytest.mark.parametrize("word, expected", [("--clases", "--classes"), ("--iuo", "--iou"), ("--bogus", None),
                                            ("--conf=0.3", "--conf"), ("detetc", "detect"), ("xyz", None)])
def test_suggest_picks_the_closest_name_or_none(word, expected):
    assert Parser.suggest(word, ["--classes", "--iou", "--conf", "--model", "detect", "export"]) == expected
