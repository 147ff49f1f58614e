"""``statelink``: serve devices, call commands, run/resume/list/check/draw workflows, list a
fleet, run the demo.

Exit codes: 0 success; 1 a command error, a failed workflow, or the server could not start;
2 an invalid config or usage; 3 the server (or the MQTT broker) is unreachable; 130
interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, 129 by SIGHUP (``run``, ``demo`` and
``call``: a workflow runs its on_abort state first, a call asks the server to cancel its
command).

One module per subcommand (``serve``, ``call``, ``check``, ``fleet``, ``graph``, ``run`` with
``demo``, ``resume``, ``runs``), each adding its parser with ``register(subparsers)``; what
they share is in :mod:`controller.cli.common`. This module only assembles the parser and
dispatches.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from statemachines.source import ConfigErrors

from . import call, check, fleet, graph, resume, run, runs, serve
from .common import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    client_ssl,
    load_devices,
    read_secret,
    signal_exit_code,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("statelink")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statelink",
        description="State-machine driven device controller: JSON-RPC device server and "
        "workflow runner.",
    )
    add_logging_args(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"statelink {_version()}")
    sub = parser.add_subparsers(
        dest="cmd",
        required=True,
        metavar="COMMAND",
        help="`statelink COMMAND --help` shows its options and examples",
    )
    for register in (
        serve.register,
        call.register,
        run.register,
        resume.register,
        runs.register,
        check.register,
        fleet.register,
        graph.register,
        run.register_demo,
    ):  # in the order of --help
        register(sub)
    for subparser in sub.choices.values():  # before or after the subcommand, as one likes
        add_logging_args(subparser, defaults=False)
    return parser


def add_logging_args(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--log-level`` and ``--quiet``. On a subcommand (``defaults=False``) an option not given
    leaves the value given before the subcommand (or the default) alone."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO" if defaults else argparse.SUPPRESS,
        help="log verbosity (default INFO)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="no log line per command on the server (serve; the demo's own server is quiet)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``statelink`` command: parse ``argv``, run the subcommand, return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("transitions").setLevel(max(logging.WARNING, logging.root.level))
    if args.quiet:
        logging.getLogger("statelink.server.calls").setLevel(logging.WARNING)
    try:
        code: int = args.handler(args)
        return code
    except ConfigErrors as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"statelink {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C, or common.Interrupted (SIGTERM, SIGHUP)
        print(f"statelink {args.cmd}: interrupted", file=sys.stderr)
        signum = getattr(exc, "signum", None)
        return EXIT_ABORTED if signum is None else signal_exit_code(signum)


__all__ = [
    "EXIT_ABORTED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "client_ssl",
    "load_devices",
    "main",
    "read_secret",
]
