"""``statelink fleet``: the nodes behind an MQTT broker, from their retained topics (one table,
JSON, or a live view with ``--watch``; docs/fleet.md).

Columns: node, status (online/offline), last seen (``now`` for an online node; the time of a
clean stop; ``lost`` for a node whose Last Will the broker published), devices with their
states. Exit 0 (also for an empty fleet), 2 bad usage, 3 the broker is unreachable or refused
the login or the subscription.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from .common import (
    EXIT_OK,
    EXIT_UNREACHABLE,
    UsageError,
    abort_signals,
    add_mqtt_args,
    examples,
    mqtt_options,
    plural,
    say,
    seconds,
)

if TYPE_CHECKING:
    from rich.table import Table

    from ..mqtt.fleet import FleetWatch, NodeView
    from .common import Subparsers

_COLUMNS = ("NODE", "STATUS", "LAST SEEN", "DEVICES")
#: seconds between redraws of the live view when nothing changes (the ages move on)
REDRAW = 1.0
#: seconds at least between two redraws (a busy fleet changes many times a second)
MIN_REDRAW = 0.25


def register(sub: Subparsers) -> None:
    fleet = sub.add_parser(
        "fleet",
        help="list the nodes of a fleet (MQTT broker): online/offline, last seen, device states",
        **examples(
            "statelink fleet --broker mqtt://broker.lan",
            "statelink fleet --broker mqtt://broker.lan --watch",
            "statelink fleet --broker mqtts://broker.lan --tls-ca ca.pem --mqtt-user ops --json",
        ),
    )
    fleet.set_defaults(handler=cmd_fleet)
    fleet.add_argument(
        "--broker", required=True, metavar="URL", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    )
    output = fleet.add_mutually_exclusive_group()
    output.add_argument(
        "--watch",
        action="store_true",
        help="keep the table live until Ctrl-C (output that is not a terminal: the table, "
        "then one line per change)",
    )
    output.add_argument("--json", action="store_true", help="the snapshot as one JSON object")
    fleet.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="seconds to connect and read the retained topics (default 10)",
    )
    add_mqtt_args(fleet, tls_ca=True)


def cmd_fleet(args: argparse.Namespace) -> int:
    from statemachines.addresses import parse_broker

    from ..mqtt.connection import BrokerError
    from ..mqtt.fleet import FleetWatch

    try:
        broker = parse_broker(args.broker)
    except ValueError as exc:
        raise UsageError(f"--broker: {exc}")
    options = dataclasses.replace(mqtt_options(args), connect_timeout=args.timeout)
    changed = threading.Event()
    watch = FleetWatch(broker, options, on_change=changed.set)
    try:
        watch.start(args.timeout)
    except BrokerError as exc:
        say(f"statelink fleet: {exc}")
        return EXIT_UNREACHABLE
    try:
        if args.watch:
            return _watch(watch, changed)
        nodes, now = watch.nodes(), _now()
        if args.json:
            print(json.dumps(snapshot_json(watch, nodes, now), indent=2))
        else:
            print_table(watch, nodes, now)
        return EXIT_OK
    finally:
        watch.close()


def _now() -> str:
    from ..mqtt.fleet import utc_now

    return utc_now()


def snapshot_json(watch: FleetWatch, nodes: list[NodeView], now: str) -> dict[str, Any]:
    """The fleet as ``--json`` prints it."""
    return {
        "broker": str(watch.broker),
        "prefix": watch.topics.prefix,
        "at": now,
        "nodes": [node.as_json(now) for node in nodes],
        "incomplete": watch.overflow,
    }


def age(when: str, now: str) -> str:
    """``when`` with how long ago it was (``2025-06-01T10:00:00Z (5 min ago)``); ``when``
    alone if it is not a time."""
    from ..mqtt.fleet import parse_time

    then, current = parse_time(when), parse_time(now)
    if then is None or current is None:
        return when
    delta = max(0, int((current - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{when} ({delta // size} {unit} ago)"
    return f"{when} ({delta} s ago)"


def status_text(node: NodeView) -> str:
    if node.online is None:
        return "unknown"
    return "online" if node.online else "offline"


def last_seen_text(node: NodeView, now: str) -> str:
    """``now``; the time (and age) of a clean stop; ``lost`` (with when, if this watch saw
    the Will arrive); ``-`` when unknown (the status says why)."""
    if node.online is None:
        return f"- ({node.problem})" if node.problem else "-"
    if node.online:
        return "now"
    if node.reason == "lost":
        return f"lost at {age(node.lost_at, now)}" if node.lost_at else "lost"
    seen = node.last_seen(now)
    text = age(seen, now) if seen else "-"
    return f"{text}, {node.reason}" if node.reason and node.reason != "stopped" else text


def devices_text(node: NodeView, separator: str = ", ") -> str:
    devices = node.devices()
    return separator.join(f"{d}={s or '?'}" for d, s in devices.items()) if devices else "-"


def counts(watch: FleetWatch, nodes: list[NodeView]) -> str:
    """``3 nodes: 2 online, 1 offline``."""
    online = sum(1 for node in nodes if node.online)
    offline = sum(1 for node in nodes if node.online is False)
    parts = [f"{online} online", f"{offline} offline"]
    if len(nodes) - online - offline:
        parts.append(f"{len(nodes) - online - offline} unknown")
    more = " (more nodes or devices than shown: over the bounds)" if watch.overflow else ""
    return f"{plural(len(nodes), 'node')}: {', '.join(parts)}{more}"


def summary(watch: FleetWatch, nodes: list[NodeView]) -> str:
    where = f"{watch.broker}, prefix {watch.topics.prefix}"
    if not nodes:
        return f"no nodes on {where} (nothing retained on {watch.topics.status()})"
    return f"{counts(watch, nodes)} ({where})"


def print_table(watch: FleetWatch, nodes: list[NodeView], now: str) -> None:
    """The plain table (aligned columns), then the summary line."""
    if nodes:
        rows = [
            (node.node, status_text(node), last_seen_text(node, now), devices_text(node))
            for node in nodes
        ]
        widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
        for row in [_COLUMNS, *rows]:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            print("  ".join(cells).rstrip())
    print(summary(watch, nodes), flush=True)


def render(watch: FleetWatch, nodes: list[NodeView], now: str) -> Table:
    """The live view's table."""
    from rich.table import Table

    colours = {"online": "green", "offline": "red", "unknown": "yellow"}
    table = Table(title=f"fleet on {watch.broker} (prefix {watch.topics.prefix})")
    for column in _COLUMNS:
        table.add_column(column.lower(), no_wrap=column != "DEVICES")
    for node in nodes:
        status = status_text(node)
        table.add_row(
            node.node,
            f"[{colours[status]}]{status}[/]",
            last_seen_text(node, now),
            devices_text(node, "\n"),
        )
    clock = now[11:19]
    state = "" if watch.connected else "\n[red]broker connection lost, reconnecting[/]"
    table.caption = f"{counts(watch, nodes)}{state}\nupdated {clock} UTC · Ctrl-C to quit"
    return table


def _watch(watch: FleetWatch, changed: threading.Event) -> int:
    """Until Ctrl-C (or SIGTERM / SIGHUP): exit 0."""
    try:
        with abort_signals():
            if sys.stdout.isatty():
                _watch_live(watch, changed)
            else:
                _watch_plain(watch, changed)
    except KeyboardInterrupt:  # Ctrl-C, or common.Interrupted: the normal end of a watch
        pass
    except BrokenPipeError:  # e.g. `statelink fleet --watch | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return EXIT_OK


def _watch_live(watch: FleetWatch, changed: threading.Event) -> None:
    from rich.live import Live

    pause = threading.Event()  # never set: bounds the redraw rate
    with Live(render(watch, watch.nodes(), _now()), auto_refresh=False) as live:
        while True:
            changed.wait(REDRAW)
            changed.clear()
            watch.changes()  # the table shows them; nothing else to keep
            live.update(render(watch, watch.nodes(), _now()), refresh=True)
            pause.wait(MIN_REDRAW)


def _watch_plain(watch: FleetWatch, changed: threading.Event) -> None:
    print_table(watch, watch.nodes(), _now())
    while True:
        changed.wait(REDRAW)
        changed.clear()
        for change in watch.changes():
            who = f"{change.node} " if change.node else ""
            print(f"{change.at} {who}{change.text}", flush=True)
