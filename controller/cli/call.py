"""``statelink call``: call one method and print its result as JSON.

SIGINT (Ctrl-C), SIGTERM and SIGHUP ask the server to cancel the command (``rpc.cancel``)
and exit 130, 143 or 129. On ``--timeout`` the command is cancelled on the server too, and the
message says whether it was. On a terminal, the command's progress shows on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from statemachines import errorkinds as ek
from statemachines.addresses import DEFAULT_PORT, NodeAddress, ServerAddress, format_address
from statemachines.source import suggest

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Interrupted,
    UsageError,
    abort_signals,
    add_client_tls_args,
    add_mqtt_args,
    add_secret_args,
    address_option,
    client_ssl,
    examples,
    mqtt_options,
    read_secret,
    seconds,
    signal_exit_code,
)

if TYPE_CHECKING:
    from ..client_base import BaseClient, CommandFuture
    from .common import Subparsers


def register(sub: Subparsers) -> None:
    call = sub.add_parser(
        "call",
        help="call one method and print its result as JSON",
        description="Call one method and print its result as JSON.",
        **examples(
            "statelink call demo.calibrate '{\"steps\": 3}' --timeout 30",
            "statelink call --server 192.168.1.20:15769 rpc.discover",
            "statelink call --server mqtt://broker.lan/pi-1 demo.state",
        ),
    )
    call.set_defaults(handler=cmd_call)
    call.add_argument(
        "--server",
        "-s",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT|mqtt://BROKER/NODE",
        help=f"the server to call, or a fleet node behind an MQTT broker (default "
        f"127.0.0.1:{DEFAULT_PORT})",
    )
    call.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="seconds to wait for the reply (default 10; long commands need more)",
    )
    add_secret_args(call)
    add_client_tls_args(call)
    add_mqtt_args(call)
    call.add_argument("method", help="e.g. demo.state, rpc.discover")
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


class _Abort:
    """The abort signals' handler: raise :class:`Interrupted` (as Ctrl-C does), except while
    the command is being sent (:meth:`held_back`): a signal then is held until the request is
    out, and raised there, so that the command is cancelled on the server however soon the
    signal comes."""

    def __init__(self) -> None:
        self._holding = False
        self._held: int | None = None

    def __call__(self, signum: int) -> None:
        if not self._holding:
            raise Interrupted(signum)
        if self._held is None:
            self._held = signum

    @contextlib.contextmanager
    def held_back(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._held is not None:
            raise Interrupted(self._held)


def cmd_call(args: argparse.Namespace) -> int:
    abort = _Abort()
    with abort_signals(abort):  # SIGTERM and SIGHUP abort as Ctrl-C does
        return _call(args, abort)


def _call(args: argparse.Namespace, abort: _Abort) -> int:
    from ..errors import (
        ClientTimeoutError,
        ConnectionLostError,
        NodeOfflineError,
        RpcError,
        UnauthorizedError,
    )

    params = json_params(args.params)
    address = address_option("--server", args.server)
    where = format_address(address)
    try:
        client = _connect(address, args)
    except UnauthorizedError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ConnectionLostError) as exc:
        hint = (
            ""
            if isinstance(address, NodeAddress)
            else " (is `statelink serve` running there? --server HOST:PORT picks another)"
        )
        print(f"cannot reach {where}: {exc}{hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    with client:
        if sys.stderr.isatty():
            client.subscribe("rpc.progress", _progress_printer(client))
        future: CommandFuture | None = None
        try:
            with abort.held_back():  # a signal from here on finds the request sent
                future = client.send_command(args.method, params, timeout=args.timeout)
            result = future.result(timeout=args.timeout + 5.0)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM or SIGHUP (Interrupted)
            if future is None:  # nothing was sent yet
                raise
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
        except (ConnectionLostError, NodeOfflineError) as exc:
            print(f"cannot reach {where}: {exc.message}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except ClientTimeoutError as exc:
            print(
                f"error {exc.code}: {exc.message}; {_cancel_after_timeout(client, future, args)}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        except RpcError as exc:
            hint = ""
            if exc.code == ek.METHOD_NOT_FOUND:
                hint = f": {args.method}{_did_you_mean(client, args.method)}"
            print(f"error {exc.code}: {exc.message}{hint}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return EXIT_OK


def _connect(address: ServerAddress, args: argparse.Namespace) -> BaseClient:
    """The connected client of ``--server``: TCP, or a fleet node through its broker."""
    connect_timeout = min(args.timeout, 10.0)
    if isinstance(address, NodeAddress):
        import dataclasses

        from ..mqtt.client import MqttClient

        options = dataclasses.replace(mqtt_options(args), connect_timeout=connect_timeout)
        return MqttClient(address, options=options, name="statelink-call")
    from ..client import Client

    return Client(
        address,
        name="statelink-call",
        secret=read_secret(args),
        ssl=client_ssl(args),
        reconnect=False,
        connect_timeout=connect_timeout,
    )


def _progress_printer(client: Any) -> Any:
    """A ``rpc.progress`` handler that rewrites one stderr line (terminal only)."""

    def show(params: Any) -> None:
        if not isinstance(params, dict) or not isinstance(params.get("progress"), (int, float)):
            return
        message = str(params.get("message") or "")[:60]
        sys.stderr.write(f"\r\x1b[K{params['progress']:.0%} {message}")
        sys.stderr.flush()

    return show


def _cancel_after_timeout(client: Any, future: Any, args: argparse.Namespace) -> str:
    """Cancel the timed-out command on the server; say what became of it."""
    try:
        answer = client.cancel(future).result(timeout=5.0)
    except Exception as exc:
        return f"it may still be running on the server (cancelling failed: {exc})"
    if isinstance(answer, dict) and answer.get("cancelled"):
        return f"cancelled {args.method} on the server (a longer --timeout lets it finish)"
    return f"{args.method} was no longer running on the server (it finished or never started)"


def _did_you_mean(client: Any, method: str) -> str:
    """`` (did you mean 'demo.state'?)`` from the server's methods, else how to list them."""
    listing = " (`statelink call rpc.discover` lists the methods)"
    try:
        described = client.call("rpc.discover", timeout=5.0)
    except Exception:
        return listing
    names = [m.get("name") for m in described.get("methods", []) if isinstance(m, dict)]
    return suggest(method, [n for n in names if isinstance(n, str)]) or listing
