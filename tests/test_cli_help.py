"""Every ``statelink`` option says what it does, and every subcommand's ``--help`` ends with
example command lines that the parser accepts."""

from __future__ import annotations

import argparse
import shlex

import pytest

from controller.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        and not action.help
    ]


def test_the_walk_finds_every_subcommand() -> None:
    names = "serve call run resume runs check fleet graph demo"
    assert set(subcommands()) == set(names.split())


def test_every_top_level_option_has_help() -> None:
    assert undocumented(build_parser()) == []


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help(name: str) -> None:
    assert undocumented(subcommands()[name]) == [], f"statelink {name}: options without help="


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_help_shows_examples_the_parser_accepts(name: str) -> None:
    parser = subcommands()[name]
    help_text = parser.format_help()
    assert parser.epilog and parser.epilog.startswith(("example:", "examples:")), name
    assert parser.epilog in help_text  # kept as written (one command line each)
    lines = [line.strip() for line in parser.epilog.splitlines()[1:]]
    assert lines and all(line.startswith("statelink ") for line in lines), lines
    assert any(line.startswith(f"statelink {name}") for line in lines), lines
    for line in lines:
        argv = shlex.split(line.split(" | ")[0])[1:]  # the statelink part of a pipeline
        args = build_parser().parse_args(argv)
        assert args.cmd == argv[0], line
