"""What every ``statelink`` subcommand shares: exit codes, :class:`UsageError`, argument
types and groups, the secret and TLS options, ``--server`` values and device configs.

Subcommand modules import from here; this module imports no subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeAlias

from statemachines.addresses import (
    DEFAULT_TOPIC_PREFIX,
    ServerAddress,
    parse_server,
    split_named,
)
from statemachines.source import ConfigErrors

from .. import auth

if TYPE_CHECKING:
    from statemachines.device import DeviceSpec

    from ..mqtt.options import MqttOptions

    #: what ``add_subparsers()`` returns: each subcommand module adds its parser to it
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ABORTED = 0, 1, 2, 3, 130

#: the signals that abort a run or a call exactly as Ctrl-C does (systemd and `timeout` send
#: SIGTERM, a closed terminal SIGHUP); the exit code is 128 + the signal's number
ABORT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_exit_code(signum: int) -> int:
    """The exit code after an abort by ``signum``: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP)."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def _interrupt(signum: int) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def abort_signals(handler: Callable[[int], None] = _interrupt) -> Iterator[None]:
    """Inside: each of :data:`ABORT_SIGNALS` calls ``handler(signum)`` (default: raise
    :class:`Interrupted`); the previous handlers are back afterwards. A no-op off the main
    thread (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        handler(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in ABORT_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def say(text: str, stream: Any = None) -> None:
    """Print a line (to stderr by default); a terminal that is gone (SIGHUP) must not stop
    an abort."""
    try:
        print(text, file=stream or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def plural(count: int, noun: str) -> str:
    """``"1 command"``, ``"3 commands"``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


class UsageError(Exception):
    """A problem with the command line or a config: exit 2 with this message."""


def examples(*commands: str) -> dict[str, Any]:
    """``add_parser`` keywords: an epilog listing example command lines, kept as written."""
    head = "example:" if len(commands) == 1 else "examples:"
    return {
        "epilog": head + "".join(f"\n  {command}" for command in commands),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive, finite number of seconds")
    return value


def add_secret_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file holding the shared secret (default: $STATELINK_SECRET)",
    )


def add_client_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="CA bundle to verify the server (implies --tls)"
    )


def add_mqtt_args(parser: argparse.ArgumentParser, *, tls_ca: bool = False) -> None:
    """The broker options of every subcommand that may use MQTT (``mqtt://`` addresses,
    ``--broker``); ``tls_ca`` adds ``--tls-ca`` (commands that have no TCP ``--tls-ca``)."""
    group = parser.add_argument_group("MQTT broker (fleet; docs/fleet.md)")
    group.add_argument("--mqtt-user", metavar="USER", help="broker user name")
    group.add_argument(
        "--mqtt-password-file",
        metavar="PATH",
        help="file holding the broker password (default: $STATELINK_MQTT_PASSWORD)",
    )
    group.add_argument(
        "--topic-prefix",
        default=DEFAULT_TOPIC_PREFIX,
        metavar="PREFIX",
        help=f"first topic level(s) of every statelink topic (default {DEFAULT_TOPIC_PREFIX})",
    )
    if tls_ca:
        group.add_argument(
            "--tls-ca", metavar="FILE", help="CA bundle to verify an mqtts:// broker"
        )


def mqtt_options(args: argparse.Namespace) -> MqttOptions:
    """The :class:`MqttOptions` of :func:`add_mqtt_args`'s flags (and ``--tls-ca``);
    UsageError for an unreadable password file, a password without user, a bad prefix."""
    from ..mqtt.options import MqttOptions, read_password

    user, password_file = (
        getattr(args, "mqtt_user", None),
        getattr(args, "mqtt_password_file", None),
    )
    if password_file is not None and not user:
        raise UsageError("--mqtt-password-file needs --mqtt-user (the broker user it is for)")
    try:
        return MqttOptions(
            user=user,
            password=read_password(password_file) if user else None,
            tls_ca=getattr(args, "tls_ca", None),
            topic_prefix=getattr(args, "topic_prefix", DEFAULT_TOPIC_PREFIX),
        )
    except ValueError as exc:
        raise UsageError(str(exc))


def add_plain_arg(parser: argparse.ArgumentParser) -> None:
    """``--plain``: the run's progress as log lines instead of the live display."""
    parser.add_argument("--plain", action="store_true", help="plain log lines, no live display")


def add_state_dir_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--state-dir DIR`` (``what``: what the subcommand keeps there)."""
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help=f"{what} (default: $STATE_DIRECTORY, else ~/.local/state/statelink)",
    )


def state_dir_option(value: str | None) -> Path:
    """The state directory of ``--state-dir`` (None: the default one)."""
    from ..statedir import default_state_dir

    return Path(value) if value else default_state_dir()


def read_secret(args: argparse.Namespace) -> bytes | None:
    """The shared secret of ``--secret-file`` or ``$STATELINK_SECRET`` (None: none given)."""
    try:
        return auth.load_secret(getattr(args, "secret_file", None))
    except ValueError as exc:
        raise UsageError(str(exc))


def client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context of ``--tls`` / ``--tls-ca`` (None: plain TCP)."""
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


def address_option(option: str, text: str) -> ServerAddress:
    """``HOST:PORT`` or ``mqtt://BROKER[:PORT]/NODE`` of an option, or a UsageError saying
    what is wrong."""
    try:
        return parse_server(text)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}")


def server_options(items: Sequence[str]) -> list[tuple[str | None, ServerAddress]]:
    """The ``--server [NAME=]ADDRESS`` values of ``run``, ``resume`` and ``check``, in order
    (name None: a bare address; ADDRESS ``HOST:PORT`` or ``mqtt://BROKER/NODE``). UsageError
    for a malformed one."""
    servers = []
    for item in items:
        try:
            name, text = split_named(item)
        except ValueError as exc:
            raise UsageError(f"--server {item!r}: {exc}")
        servers.append((name, address_option("--server", text)))
    return servers


def load_devices(paths: Sequence[str]) -> list[DeviceSpec]:
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
