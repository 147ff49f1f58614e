"""``statelink``: serve devices, call commands, run/check/draw workflows, run the demo.

Exit codes: 0 success; 1 a command error, a failed workflow, or the server could not start;
2 an invalid config or usage; 3 the server is unreachable; 130 interrupted (Ctrl-C; a workflow
runs its on_abort state first, a call asks the server to cancel its command).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from typing import Any

from statemachines.source import ConfigErrors

from . import auth
from .protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME, DEFAULT_PORT

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ABORTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A problem with the command line or a config: exit 2 with this message."""


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive, finite number of seconds")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("statelink")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_secret_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file holding the shared secret (default: $STATELINK_SECRET)",
    )


def _add_client_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="CA bundle to verify the server (implies --tls)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statelink",
        description="State-machine driven device controller: JSON-RPC device server and "
        "workflow runner.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity",
    )
    parser.add_argument("--version", action="version", version=f"statelink {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the command server in the foreground")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; others need a secret)",
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
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
    _add_secret_args(serve)
    serve.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without a secret"
    )
    serve.add_argument("--max-connections", type=int, default=1024)
    serve.add_argument(
        "--max-inflight", type=int, default=256, help="requests in flight per connection"
    )
    serve.add_argument("--max-queue", type=int, default=1024, help="jobs waiting for a worker")
    serve.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME, help="bytes per line")
    serve.add_argument("--idle-timeout", type=seconds, default=300.0)
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
        "--max-outgoing",
        type=int,
        default=4 << 20,
        help="bytes queued to a client that does not read, then it is closed",
    )

    call = sub.add_parser("call", help="call one method and print its result as JSON")
    call.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT")
    call.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="seconds to wait for the reply (default 10; long commands need more)",
    )
    _add_secret_args(call)
    _add_client_tls_args(call)
    call.add_argument("method")
    call.add_argument(
        "params",
        nargs="?",
        metavar="PARAMS_JSON",
        help="JSON array or object, e.g. '{\"steps\": 3}'",
    )

    run = sub.add_parser("run", help="run a workflow with live progress")
    run.add_argument("workflow", metavar="WORKFLOW.yaml")
    run.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="override a server address of the workflow (repeatable)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one of the workflow's inputs (VALUE is read as YAML: 25, 0.5, fast, [1, 2])",
    )
    run.add_argument("--journal", metavar="FILE", help="write the run's journal (JSON lines)")
    run.add_argument("--plain", action="store_true", help="plain log lines, no live display")
    _add_secret_args(run)
    _add_client_tls_args(run)

    check = sub.add_parser("check", help="validate workflow and device configs")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="FILE",
        help="check workflows against this device config",
    )
    check.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="check workflows against a live server (rpc.discover)",
    )
    _add_secret_args(check)
    _add_client_tls_args(check)

    graph = sub.add_parser("graph", help="draw a workflow or device machine")
    graph.add_argument("file", metavar="FILE")
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")

    demo = sub.add_parser("demo", help="run the demo workflow on a simulated device, in-process")
    demo.add_argument("--journal", metavar="FILE", help="write the run's journal (JSON lines)")
    demo.add_argument("--plain", action="store_true", help="plain log lines, no live display")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("transitions").setLevel(max(logging.WARNING, logging.root.level))
    handler = {
        "serve": cmd_serve,
        "call": cmd_call,
        "run": cmd_run,
        "check": cmd_check,
        "graph": cmd_graph,
        "demo": cmd_demo,
    }[args.cmd]
    try:
        return handler(args)
    except ConfigErrors as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"statelink {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"statelink {args.cmd}: interrupted", file=sys.stderr)
        return EXIT_ABORTED


# -- helpers ---------------------------------------------------------------------------------
def read_secret(args: argparse.Namespace) -> bytes | None:
    try:
        return auth.load_secret(getattr(args, "secret_file", None))
    except ValueError as exc:
        raise UsageError(str(exc))


def client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (getattr(args, "tls", False) or getattr(args, "tls_ca", None)):
        return None
    try:
        return ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the CA bundle {args.tls_ca}: {exc}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_devices(paths: Sequence[str]) -> list[Any]:
    """Load and validate every device config; all problems at once as ConfigErrors."""
    from statemachines.device import load_device
    from statemachines.source import load_yaml

    specs, errors = [], []
    for path in paths:
        try:
            data = load_yaml(path)
            if (
                isinstance(data, dict)
                and "device" not in data
                and isinstance(data.get("states"), dict)
            ):
                raise UsageError(
                    f"{path} is a workflow, not a device config: run it with "
                    f"`statelink run {path}`, and serve a device with --device DEVICE.yaml"
                )
            specs.append(load_device(path))
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigErrors(errors)
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"two device configs name the same device: {', '.join(duplicates)}")
    return specs


# -- serve -----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .server import CommandServer, Limits

    secret = read_secret(args)
    if not is_loopback(args.host) and secret is None and not args.insecure:
        raise UsageError(
            f"refusing to listen on {args.host} without a secret: anyone on the network could "
            "drive your devices. Set STATELINK_SECRET or --secret-file, or pass --insecure if "
            "the network is trusted."
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the TLS certificate/key: {exc}")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    specs = load_devices(args.device)  # before binding: a bad config never opens a port
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
        args.port,
        workers=args.workers,
        timeout=args.timeout,
        limits=limits,
        secret=secret,
        ssl=context,
    )
    try:
        for spec in specs:
            server.add_device(spec, simulate=args.simulate)
    except Exception as exc:  # e.g. GPIO unavailable on this machine
        print(
            f"statelink serve: cannot set up the devices: {exc}"
            + ("" if args.simulate else " (use --simulate to run without hardware)"),
            file=sys.stderr,
        )
        return EXIT_FAILED
    log = logging.getLogger("statelink")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    # Installed before the port opens, so a signal at any time stops the server cleanly.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except OSError as exc:
        print(f"statelink serve: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    host, port = server.address
    devices = ", ".join(f"{s.name} ({s.path})" for s in specs) or "none"
    if not specs:
        log.warning("no --device given: serving only the rpc.* methods")
    log.info(
        "serving on %s:%s; devices: %s%s",
        host,
        port,
        devices,
        " [simulated GPIO]" if args.simulate else "",
    )
    while not stop.wait(1.0):
        pass
    server.stop()
    return EXIT_OK


# -- call ------------------------------------------------------------------------------------
def cmd_call(args: argparse.Namespace) -> int:
    from .client import Client, parse_address
    from .errors import ConnectionLostError, RpcError, UnauthorizedError

    params = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise UsageError(f"PARAMS_JSON is not valid JSON: {exc}")
        if not isinstance(params, (list, dict)):
            raise UsageError("PARAMS_JSON must be a JSON array or object")
    try:
        address = parse_address(args.server)
    except ValueError as exc:
        raise UsageError(str(exc))
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
            f"cannot reach {address[0]}:{address[1]}: {exc} "
            "(is `statelink serve` running there? --server HOST:PORT picks another)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    with client:
        future = client.send_command(args.method, params, timeout=args.timeout)
        try:
            result = future.result(timeout=args.timeout + 5.0)
        except KeyboardInterrupt:
            try:  # best effort: leave the device free rather than running for nobody
                answer = client.cancel(future).result(timeout=2.0)
                outcome = (
                    f"cancelled {args.method} on the server"
                    if isinstance(answer, dict) and answer.get("cancelled")
                    else f"{args.method} was no longer running on the server"
                )
            except Exception as exc:
                outcome = f"could not cancel {args.method} on the server: {exc}"
            print(f"interrupted: {outcome}", file=sys.stderr)
            return EXIT_ABORTED
        except ConnectionLostError as exc:
            print(f"cannot reach {address[0]}:{address[1]}: {exc.message}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except RpcError as exc:
            hint = ""
            if exc.code == -32601:
                hint = f": {args.method} (`statelink call rpc.discover` lists the methods)"
            print(f"error {exc.code}: {exc.message}{hint}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return EXIT_OK


# -- check / graph ---------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from statemachines import config_kind
    from statemachines.device import load_device
    from statemachines.workflow import check_against, load_workflow

    catalogs = _catalogs(args)
    errors = []
    for file in args.files:
        try:
            if config_kind(file) == "device":
                spec: Any = load_device(file)
                print(f"{file}: ok (device {spec.name}, {len(spec.commands)} commands)")
            else:
                spec = load_workflow(file)
                found = check_against(spec, catalogs) if catalogs else []
                if found:
                    raise ConfigErrors(found)
                print(f"{file}: ok (workflow {spec.name}, {len(spec.states)} states)")
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigErrors(errors)
    return EXIT_OK


def _catalogs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Device catalogs to check workflows against, keyed by workflow server name."""
    from statemachines.device import catalog_from_discover

    from .client import Client, parse_address
    from .errors import RpcError

    catalogs: dict[str, dict[str, Any]] = {}
    if args.device:
        merged: dict[str, Any] = {}
        for spec in load_devices(args.device):
            merged.update(spec.catalog())
        catalogs["*"] = merged
    for item in args.server:
        name, _, address = item.rpartition("=")
        try:
            with Client(
                parse_address(address),
                name="statelink-check",
                reconnect=False,
                secret=read_secret(args),
                ssl=client_ssl(args),
            ) as client:
                described = client.call("rpc.discover", timeout=10.0)
        except (OSError, ValueError, RpcError) as exc:
            raise UsageError(f"cannot discover {address}: {exc}")
        catalogs[name or "*"] = catalog_from_discover(described)
    return catalogs


def cmd_graph(args: argparse.Namespace) -> int:
    from statemachines import config_kind
    from statemachines.graph import device_graph, workflow_graph

    if config_kind(args.file) == "device":
        from statemachines.device import load_device

        print(device_graph(load_device(args.file), args.format))
    else:
        from statemachines.workflow import load_workflow

        print(workflow_graph(load_workflow(args.file), args.format))
    return EXIT_OK


# -- run / demo ------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .run_command import run_workflow_command

    return run_workflow_command(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .run_command import run_demo_command

    return run_demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
