"""``statelink call``: call one method and print its result as JSON.

SIGINT (Ctrl-C), SIGTERM and SIGHUP ask the server to cancel the command (``rpc.cancel``)
and exit 130, 143 or 129."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING

from statemachines import errorkinds as ek
from statemachines.addresses import DEFAULT_PORT, format_address

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    UsageError,
    abort_signals,
    add_client_tls_args,
    add_secret_args,
    address_option,
    client_ssl,
    read_secret,
    seconds,
    signal_exit_code,
)

if TYPE_CHECKING:
    from .common import Subparsers


def register(sub: Subparsers) -> None:
    call = sub.add_parser("call", help="call one method and print its result as JSON")
    call.set_defaults(handler=cmd_call)
    call.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT")
    call.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="seconds to wait for the reply (default 10; long commands need more)",
    )
    add_secret_args(call)
    add_client_tls_args(call)
    call.add_argument("method")
    call.add_argument(
        "params",
        nargs="?",
        metavar="PARAMS_JSON",
        help="JSON array or object, e.g. '{\"steps\": 3}'",
    )


def json_params(text: str | None) -> list[object] | dict[str, object] | None:
    """``PARAMS_JSON``: a JSON array or object (None: no params)."""
    if text is None:
        return None
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"PARAMS_JSON is not valid JSON: {exc}")
    if not isinstance(params, (list, dict)):
        raise UsageError("PARAMS_JSON must be a JSON array or object")
    return params


def cmd_call(args: argparse.Namespace) -> int:
    with abort_signals():  # SIGTERM and SIGHUP raise as Ctrl-C does
        return _call(args)


def _call(args: argparse.Namespace) -> int:
    from ..client import Client
    from ..errors import ConnectionLostError, RpcError, UnauthorizedError

    params = json_params(args.params)
    address = address_option("--server", args.server)
    where = format_address(address)
    try:
        client = Client(
            address,
            name="statelink-call",
            secret=read_secret(args),
            ssl=client_ssl(args),
            reconnect=False,
            connect_timeout=min(args.timeout, 10.0),
        )
    except UnauthorizedError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ConnectionLostError) as exc:
        print(
            f"cannot reach {where}: {exc} "
            "(is `statelink serve` running there? --server HOST:PORT picks another)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    with client:
        future = client.send_command(args.method, params, timeout=args.timeout)
        try:
            result = future.result(timeout=args.timeout + 5.0)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM or SIGHUP (Interrupted)
            try:  # best effort: leave the device free rather than running for nobody
                answer = client.cancel(future).result(timeout=2.0)
                outcome = (
                    f"cancelled {args.method} on the server"
                    if isinstance(answer, dict) and answer.get("cancelled")
                    else f"{args.method} was no longer running on the server"
                )
            except Exception as exc:
                outcome = f"could not cancel {args.method} on the server: {exc}"
            try:
                print(f"interrupted: {outcome}", file=sys.stderr)
            except OSError:  # the terminal is gone (SIGHUP)
                pass
            return signal_exit_code(getattr(interrupt, "signum", signal.SIGINT))
        except ConnectionLostError as exc:
            print(f"cannot reach {where}: {exc.message}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except RpcError as exc:
            hint = ""
            if exc.code == ek.METHOD_NOT_FOUND:
                hint = f": {args.method} (`statelink call rpc.discover` lists the methods)"
            print(f"error {exc.code}: {exc.message}{hint}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return EXIT_OK
