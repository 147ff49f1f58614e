"""``statelink serve``: the command server in the foreground, serving device configs over TCP
(``--port``), through an MQTT broker as a fleet node (``--broker``, docs/fleet.md), or both."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from statemachines.addresses import DEFAULT_PORT, check_node_name, parse_broker
from statemachines.source import ConfigError, ConfigErrors

from ..protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    UsageError,
    add_mqtt_args,
    add_secret_args,
    examples,
    is_loopback,
    load_devices,
    mqtt_options,
    read_secret,
    seconds,
    state_dir_option,
)

if TYPE_CHECKING:
    from statemachines.addresses import BrokerUrl
    from statemachines.device import DeviceSpec

    from .common import Subparsers


def register(sub: Subparsers) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the command server in the foreground",
        **examples(
            "statelink serve --device config/devices/demo.yaml --simulate",
            "statelink serve --host 0.0.0.0 --secret-file /etc/statelink/secret --device door.yaml",
            "statelink serve --broker mqtt://broker.lan --node pi-door --device door.yaml",
        ),
    )
    serve.set_defaults(handler=cmd_serve)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; others need a secret)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP port to listen on (default {DEFAULT_PORT}; with --broker: none unless given)",
    )
    serve.add_argument(
        "--broker",
        metavar="URL",
        help="serve as a fleet node through this MQTT broker: mqtt://HOST[:PORT] or mqtts:// "
        "(connects out; no TCP port unless --port is given too)",
    )
    serve.add_argument(
        "--node",
        metavar="NAME",
        help="this node's name in the fleet (with --broker; default: the host name)",
    )
    serve.add_argument("--workers", type=int, default=8, help="worker threads (default 8)")
    serve.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="FILE",
        help="device config to serve (repeat for several devices)",
    )
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="drive GPIO through gpiozero's mock pins (no hardware needed)",
    )
    serve.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        help="default command timeout in seconds (default 30)",
    )
    add_secret_args(serve)
    serve.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without a secret"
    )
    serve.add_argument(
        "--max-connections", type=int, default=1024, help="open connections (default 1024)"
    )
    serve.add_argument(
        "--max-inflight", type=int, default=256, help="requests in flight per connection"
    )
    serve.add_argument("--max-queue", type=int, default=1024, help="jobs waiting for a worker")
    serve.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME, help="bytes per line")
    serve.add_argument(
        "--idle-timeout",
        type=seconds,
        default=300.0,
        help="seconds a connection may stay silent before it is closed (default 300)",
    )
    serve.add_argument(
        "--frame-timeout",
        type=seconds,
        default=30.0,
        help="seconds to finish a line once it started (default 30)",
    )
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="calls per batch")
    serve.add_argument(
        "--max-depth", type=int, default=DEFAULT_MAX_DEPTH, help="JSON nesting levels per message"
    )
    serve.add_argument(
        "--handshake-timeout",
        type=seconds,
        default=10.0,
        help="seconds to finish TLS and authentication (default 10)",
    )
    serve.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help="where idempotency keys are kept across restarts (default: $STATE_DIRECTORY, "
        "else ~/.local/state/statelink)",
    )
    serve.add_argument(
        "--key-retention",
        type=_duration,
        default=86400.0,
        metavar="DURATION",
        help="how long a finished command's key and outcome are kept (default 24h)",
    )
    serve.add_argument(
        "--max-outgoing",
        type=int,
        default=4 << 20,
        help="bytes queued to a client that does not read, then it is closed",
    )
    add_mqtt_args(serve, tls_ca=True)


def _duration(text: str) -> float:
    """A positive duration (``90s``, ``30m``, ``24h``) for argparse."""
    from statemachines.durations import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server TLS context of ``--tls-cert``/``--tls-key`` (None: plain TCP)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if not args.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate/key: {exc}")
    return context


def check_handlers(specs: Sequence[DeviceSpec]) -> None:
    """Import every device's handlers now, before a port opens: all problems at once as
    ConfigErrors (``file:line: message``), as for any other config error."""
    from ..handlers import resolve_handlers

    errors: list[ConfigError] = []
    for spec in specs:
        try:
            resolve_handlers(spec)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigErrors(errors)


def fleet_node(args: argparse.Namespace) -> tuple[BrokerUrl, str] | None:
    """The broker and node name of ``--broker``/``--node`` (None: no ``--broker``)."""
    if args.broker is None:
        if args.node is not None:
            raise UsageError("--node names this server in a fleet: give --broker too")
        return None
    try:
        broker = parse_broker(args.broker)
    except ValueError as exc:
        raise UsageError(f"--broker: {exc}")
    if args.node is None:
        try:
            return broker, check_node_name(socket.gethostname())
        except ValueError as exc:
            raise UsageError(f"the host name cannot name this node ({exc}): give --node NAME")
    try:
        return broker, check_node_name(args.node)
    except ValueError as exc:
        raise UsageError(f"--node: {exc}")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..devices import add_device
    from ..keystore import KeyStoreError, KeyStoreLocked
    from ..mqtt.connection import BrokerError
    from ..mqtt.node import MqttNode
    from ..server import CommandServer, Limits

    fleet = fleet_node(args)
    options = mqtt_options(args) if fleet else None
    tcp = fleet is None or args.port is not None  # --broker alone: no listening socket
    secret = read_secret(args)
    if tcp and not is_loopback(args.host) and secret is None and not args.insecure:
        raise UsageError(
            f"refusing to listen on {args.host} without a secret: anyone on the network could "
            "drive your devices. Set STATELINK_SECRET or --secret-file, or pass --insecure if "
            "the network is trusted."
        )
    context = server_tls(args)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    specs = load_devices(args.device)  # before binding: a bad config never opens a port
    check_handlers(specs)
    state_dir = state_dir_option(args.state_dir)
    limits = Limits(
        max_connections=args.max_connections,
        max_inflight=args.max_inflight,
        max_queue=args.max_queue,
        max_frame=args.max_frame,
        idle_timeout=args.idle_timeout,
        frame_timeout=args.frame_timeout,
        max_batch=args.max_batch,
        max_depth=args.max_depth,
        handshake_timeout=args.handshake_timeout,
        max_outgoing=args.max_outgoing,
    )
    server = CommandServer(
        args.host,
        (DEFAULT_PORT if args.port is None else args.port) if tcp else None,
        workers=args.workers,
        timeout=args.timeout,
        limits=limits,
        secret=secret,
        ssl=context,
        state_dir=state_dir,
        key_retention=args.key_retention,
    )
    if fleet is not None:
        MqttNode(server, fleet[0], fleet[1], options)
    try:
        for spec in specs:
            add_device(server, spec, simulate=args.simulate)
    except ConfigErrors:
        raise  # a config problem (exit 2), not the machine's
    except Exception as exc:  # e.g. GPIO unavailable on this machine
        print(
            f"statelink serve: cannot set up the devices: {exc}"
            + ("" if args.simulate else " (use --simulate to run without hardware)"),
            file=sys.stderr,
        )
        return EXIT_FAILED
    log = logging.getLogger("statelink")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    # Installed before the port opens, so a signal at any time stops the server cleanly.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except KeyStoreLocked as exc:
        print(
            f"statelink serve: state directory {state_dir} is in use by another statelink "
            f"server ({exc}); give each server its own --state-dir",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyStoreError as exc:
        print(f"statelink serve: cannot use state directory {state_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokerError as exc:
        print(f"statelink serve: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as exc:
        print(f"statelink serve: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    devices = ", ".join(f"{s.name} ({s.path})" for s in specs) or "none"
    if not specs:
        log.warning("no --device given: serving only the rpc.* methods")
    simulated = " [simulated GPIO]" if args.simulate else ""
    served = f"devices: {devices}{simulated}; keys in {state_dir}"
    if tcp:
        host, port = server.address
        log.info("serving on %s:%s; %s", host, port, served)
    if fleet is not None:
        assert options is not None
        log.info("serving node %s on %s (prefix %s)", fleet[1], fleet[0], options.topic_prefix)
        if not tcp:
            log.info("no TCP port (give --port to serve TCP too); %s", served)
    if tcp and args.insecure and secret is None and not is_loopback(args.host):
        log.warning(
            "--insecure: listening on %s without a secret; anyone who can reach port %s can "
            "drive the devices (set STATELINK_SECRET or --secret-file to require one)",
            host,
            port,
        )
    while not stop.wait(1.0):
        pass
    server.stop()
    return EXIT_OK
