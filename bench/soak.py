"""Soak test: many commands over many connections, with random client timeouts and random
disconnects, against a statelink server in a child process on 127.0.0.1.

    python -m bench.soak --commands 200000 --connections 64      # the full size (~1-2 min)
    python -m bench.soak --commands 5000 --connections 16 --seed 7 --json

It checks, and exits 1 (printing each mismatch) unless all of these hold:

- every request gets exactly one outcome (result, server error, client timeout or
  connection-lost), no reply is duplicated on the wire, and none is for an id never sent;
- every reply that arrives is the right one for its command (results echo, error codes match);
- the client's tally matches the server's ``rpc.stats``: ``requests_total``, ``errors_by_code``,
  ``replies_total``, ``connections_total``, no ``late_outcomes``, nothing left in flight.

Why the tally can be exact despite timeouts and disconnects: every command's *server* outcome
does not depend on timing (``slow`` always finishes with its result, ``fail`` always faults,
``expire`` always overruns its 0.25 s server timeout and is only sent on connections that never
disconnect), and before a random disconnect the client waits for an ``rpc.ping`` on the same
connection, so every request it sent has been counted by the server. Client-side outcomes
(timeouts, connection-lost) are then free to race.

The server is ``--workers`` threads with default limits; each connection keeps at most
``--window`` requests in flight. Everything is bounded: ``--deadline`` seconds for the whole run,
and the child server exits with this process (or after ``--deadline`` + 60 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
SERVER_TIMEOUT_EXPIRE = 0.25  #: server-side timeout of the ``expire`` command

BUSY, TIMEOUT, FAULT, NOT_FOUND, BAD_PARAMS = -32003, -32002, -32006, -32601, -32602


# -- the server (child process) --------------------------------------------------------------
def serve_main(workers: int, lifetime: float, parent: int) -> int:
    """The soak server: prints ``READY host:port``; ends with its parent, on stdin EOF, or
    after ``lifetime`` seconds."""
    import asyncio
    import logging

    from controller import CommandServer

    # planned handler faults would each log a traceback; the soak checks outcomes, not logs
    logging.getLogger("statelink").setLevel(logging.CRITICAL)

    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    if os.getppid() != parent:
        return 2
    watchdog = threading.Timer(lifetime, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()

    server = CommandServer(HOST, 0, workers=workers, grace=1.0, name="statelink-soak")

    @server.command("echo")
    def echo(value: Any = None) -> Any:
        return value

    @server.command("fail")
    def fail(message: str = "soak") -> None:
        raise RuntimeError(message)

    async def aecho(value: Any = None) -> Any:
        return value

    async def slow(seconds: float, value: Any = None) -> Any:
        await asyncio.sleep(seconds)
        return value

    async def expire() -> None:
        await asyncio.sleep(60)

    server.add_command("aecho", aecho)
    server.add_command("slow", slow)
    server.add_command("expire", expire, timeout=SERVER_TIMEOUT_EXPIRE)
    server.start()
    print(f"READY {server.address[0]}:{server.address[1]}", flush=True)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    server.stop(grace=1.0)
    return 0


class ChildServer:
    def __init__(self, workers: int, lifetime: float):
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            "--workers",
            str(workers),
            "--lifetime",
            str(lifetime),
            "--parent",
            str(os.getpid()),
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO)
        )
        assert self.proc.stdout is not None
        line = self._readline(30.0)
        match = re.match(rb"READY ([\d.]+):(\d+)", line)
        if match is None:
            self.stop()
            raise RuntimeError(f"the soak server did not start: {line!r}")
        self.address = (match.group(1).decode(), int(match.group(2)))

    def _readline(self, timeout: float) -> bytes:
        result: list[bytes] = []
        reader = threading.Thread(
            target=lambda: result.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        return result[0] if result else b""

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- the clients -----------------------------------------------------------------------------
@dataclass
class Sent:
    """One request and what became of it."""

    kind: str
    expected: Any  #: the result, or the error code, the server will answer with
    outcomes: list[str] = field(default_factory=list)


@dataclass
class Options:
    commands: int = 5000
    connections: int = 16
    seed: int = 1
    window: int = 8
    disconnect: float = 0.004  #: chance, before each command on a flaky connection
    deadline: float = 600.0
    workers: int = 8


def _make_client_class() -> type:
    from controller import Client
    from controller.protocol import ErrorResponse, Response

    class CountingClient(Client):
        """Counts every reply on the wire by id, before the client matches it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.wire: Counter[Any] = Counter()
            super().__init__(*args, **kwargs)

        def handle_event(self, event: Any) -> None:
            if isinstance(event, (Response, ErrorResponse)):
                self.wire[event.id] += 1
            super().handle_event(event)

    return CountingClient


class Driver(threading.Thread):
    """One connection's worth of traffic (reconnecting after each random disconnect)."""

    def __init__(
        self,
        index: int,
        count: int,
        options: Options,
        address: tuple[str, int],
        scheduler: Any,
        client_class: type,
        deadline: float,
    ):
        super().__init__(name=f"soak-{index}", daemon=True)
        self.index = index
        self.count = count
        self.options = options
        self.address = address
        self.scheduler = scheduler
        self.client_class = client_class
        self.deadline = deadline
        self.flaky = index % 2 == 1  #: flaky connections disconnect; stable ones get "expire"
        self.rng = random.Random(options.seed * 1_000_003 + index)
        self.sent: list[Sent] = []
        self.notifications = 0
        self.hellos = 0
        self.barriers = 0
        self.disconnects = 0
        self.clients: list[Any] = []
        self.problems: list[str] = []
        self._window = threading.Semaphore(options.window)
        self._lock = threading.Lock()
        self._outstanding = 0
        self._idle = threading.Event()
        self._idle.set()

    def open(self) -> Any:
        client = self.client_class(
            self.address,
            name=f"soak-{self.index}",
            reconnect=False,
            scheduler=self.scheduler,
            connect_timeout=30.0,
        )
        self.hellos += 1
        self.clients.append(client)
        return client

    def choose(self) -> tuple[str, str, Any, float, Any]:
        """kind, method, params, client timeout, expected server outcome."""
        rng = self.rng
        roll = rng.random()
        value = rng.randrange(1_000_000)
        if roll < 0.40:
            timeout = 0.002 if rng.random() < 0.05 else 10.0  # some replies race the timer
            return "echo", "echo", [value], timeout, value
        if roll < 0.60:
            return "aecho", "aecho", {"value": value}, 10.0, value
        if roll < 0.70:
            return "fail", "fail", ["planned"], 10.0, FAULT
        if roll < 0.82:
            seconds = round(rng.uniform(0.02, 0.12), 3)
            timeout = 0.01 if rng.random() < 0.3 else 10.0  # a client timeout, reply later
            return "slow", "slow", [seconds, value], timeout, value
        if roll < 0.88:
            return "missing", "no.such.method", None, 10.0, NOT_FOUND
        if roll < 0.94:
            return "badparams", "echo", {"nope": 1}, 10.0, BAD_PARAMS
        if roll < 0.97 and not self.flaky:
            return "expire", "expire", None, 10.0, TIMEOUT
        return "notify", "echo", [value], 0.0, None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # report, never hang the soak
            self.problems.append(f"connection {self.index}: {type(exc).__name__}: {exc}")

    def _run(self) -> None:
        client = self.open()
        for _ in range(self.count):
            if time.monotonic() > self.deadline:
                self.problems.append(f"connection {self.index}: deadline reached")
                break
            if self.flaky and self.rng.random() < self.options.disconnect:
                client = self.disconnect(client)
            kind, method, params, timeout, expected = self.choose()
            if kind == "notify":
                if not client.notify(method, params):
                    self.problems.append(f"connection {self.index}: notify while not connected")
                self.notifications += 1
                continue
            if not self._window.acquire(timeout=max(0.0, self.deadline - time.monotonic())):
                self.problems.append(f"connection {self.index}: window never freed")
                break
            record = Sent(kind, expected)
            self.sent.append(record)
            with self._lock:
                self._outstanding += 1
                self._idle.clear()
            client.send_command(
                method,
                params,
                timeout=timeout,
                callback=lambda future, r=record: self.settle(r, future),
            )
        if not self._idle.wait(max(1.0, self.deadline - time.monotonic())):
            self.problems.append(f"connection {self.index}: requests never resolved")
        client.close()

    def disconnect(self, client: Any) -> Any:
        """Barrier (every request sent so far reached the server), then hang up mid-flight."""
        assert client.call("rpc.ping", timeout=60.0) == "pong"
        self.barriers += 1
        self.disconnects += 1
        client.close()  # whatever is in flight resolves with connection-lost now
        return self.open()

    def settle(self, record: Sent, future: Future[Any]) -> None:
        from controller import CommandTimeoutError, ConnectionLostError, RpcError

        error = future.exception()
        if error is None:
            outcome = "result" if future.result() == record.expected else "wrong_result"
        elif (
            isinstance(error, CommandTimeoutError) and (error.data or {}).get("source") == "client"
        ):
            outcome = "client_timeout"
        elif isinstance(error, ConnectionLostError):
            outcome = "lost" if "lost before the reply" in error.message else "not_sent"
        elif isinstance(error, RpcError):
            outcome = str(error.code) if error.code == record.expected else "wrong_error"
        else:
            outcome = f"unexpected {type(error).__name__}"
        record.outcomes.append(outcome)
        self._window.release()
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.set()


# -- the run ---------------------------------------------------------------------------------
def run_soak(options: Options, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run one soak; returns the report (``report["ok"]``, ``report["mismatches"]``)."""
    from controller import Client, Scheduler

    started = time.monotonic()
    deadline = started + options.deadline
    child = ChildServer(options.workers, options.deadline + 60.0)
    scheduler = Scheduler("soak-timers")
    client_class = _make_client_class()
    try:
        per = [
            options.commands // options.connections
            + (1 if i < options.commands % options.connections else 0)
            for i in range(options.connections)
        ]
        drivers = [
            Driver(i, n, options, child.address, scheduler, client_class, deadline)
            for i, n in enumerate(per)
        ]
        log(
            f"soak: {options.commands} commands over {options.connections} connections, "
            f"seed {options.seed}, server {child.address[0]}:{child.address[1]}"
        )
        for driver in drivers:
            driver.start()
        for driver in drivers:
            driver.join(max(1.0, deadline - time.monotonic() + 30))
        elapsed = time.monotonic() - started
        with Client(child.address, reconnect=False, connect_timeout=30.0) as observer:
            polls = 0
            snapshot: dict[str, Any] = {}
            while time.monotonic() < deadline + 30:
                snapshot = observer.call("rpc.stats", timeout=30.0)
                polls += 1
                if snapshot["requests_in_flight"] == 1 and snapshot["connections"] == 1:
                    break
                threading.Event().wait(0.05)  # polling a counter; bounded by the deadline
        return _report(options, drivers, snapshot, polls, elapsed, child.address)
    finally:
        scheduler.close()
        child.stop()


def _report(
    options: Options,
    drivers: list[Driver],
    stats: dict[str, Any],
    polls: int,
    elapsed: float,
    address: tuple[str, int],
) -> dict[str, Any]:
    mismatches: list[str] = []
    for driver in drivers:
        mismatches += driver.problems
        if driver.is_alive():
            mismatches.append(f"connection {driver.index}: still running at the deadline")
    records = [r for d in drivers for r in d.sent]
    outcomes: Counter[str] = Counter()
    for record in records:
        if len(record.outcomes) != 1:
            mismatches.append(f"a {record.kind} request had {len(record.outcomes)} outcomes")
        outcomes.update(record.outcomes)
    for bad in ("wrong_result", "wrong_error", "not_sent"):
        if outcomes[bad]:
            mismatches.append(f"{outcomes[bad]} requests: {bad}")
    mismatches += [f"{n} requests: {o}" for o, n in outcomes.items() if o.startswith("unexp")]
    duplicates = unknown = wire = 0
    for driver in drivers:
        for client in driver.clients:
            wire += sum(client.wire.values())
            duplicates += sum(n - 1 for n in client.wire.values() if n > 1)
            unknown += sum(
                1
                for i in client.wire
                if not (isinstance(i, int) or (isinstance(i, str) and i.startswith("hello-")))
            )
            if client.pending:
                mismatches.append(f"connection {driver.index}: {client.pending} left pending")
    if duplicates or unknown:
        mismatches.append(f"wire: {duplicates} duplicated replies, {unknown} for unknown ids")
    lost_on_stable = sum(1 for d in drivers if not d.flaky for r in d.sent if "lost" in r.outcomes)
    if lost_on_stable:
        mismatches.append(f"{lost_on_stable} requests lost on connections that never hung up")

    # what the server must have counted
    requests = len(records)
    notifications = sum(d.notifications for d in drivers)
    hellos = sum(d.hellos for d in drivers) + 1  # + the observer
    barriers = sum(d.barriers for d in drivers)
    expected_total = requests + notifications + hellos + barriers + polls
    expected_errors: Counter[str] = Counter(
        str(r.expected) for r in records if r.kind in ("fail", "missing", "badparams", "expire")
    )
    server_errors = Counter(stats.get("errors_by_code", {}))
    checks = {
        "requests_total": (stats.get("requests_total"), expected_total),
        "errors_by_code": (dict(server_errors), dict(expected_errors)),
        "replies_total": (stats.get("replies_total"), expected_total - notifications - 1),
        "connections_total": (stats.get("connections_total"), hellos),
        "late_outcomes": (stats.get("late_outcomes"), 0),
        "requests_in_flight": (stats.get("requests_in_flight"), 1),
        "connections": (stats.get("connections"), 1),
    }
    for name, (server_value, client_value) in checks.items():
        if server_value != client_value:
            mismatches.append(
                f"rpc.stats {name} = {server_value}, the client expects {client_value}"
            )
    return {
        "ok": not mismatches,
        "mismatches": mismatches,
        "options": vars(options),
        "server": f"{address[0]}:{address[1]}",
        "elapsed_s": round(elapsed, 2),
        "commands_per_s": round((requests + notifications) / elapsed) if elapsed else None,
        "requests": requests,
        "notifications": notifications,
        "outcomes": dict(sorted(outcomes.items())),
        "wire_replies": wire,
        "duplicated_replies": duplicates,
        "disconnects": sum(d.disconnects for d in drivers),
        "connections_opened": hellos,
        "server_stats": {
            k: stats.get(k)
            for k in (
                "requests_total",
                "replies_total",
                "errors_by_code",
                "connections_total",
                "late_outcomes",
                "requests_in_flight",
                "closed_by_reason",
            )
        },
        "expected": {"requests_total": expected_total, "errors_by_code": dict(expected_errors)},
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"soak: {'OK' if report['ok'] else 'MISMATCH'}  ({report['requests']} requests + "
        f"{report['notifications']} notifications in {report['elapsed_s']} s, "
        f"{report['commands_per_s']}/s; {report['disconnects']} random disconnects, "
        f"{report['connections_opened']} connections)"
    ]
    lines.append(
        "client outcomes: " + ", ".join(f"{k}: {v}" for k, v in report["outcomes"].items())
    )
    lines.append(
        f"wire replies: {report['wire_replies']}, duplicated: {report['duplicated_replies']}"
    )
    server, expected = report["server_stats"], report["expected"]
    lines.append(
        f"rpc.stats requests_total {server['requests_total']} (client expects "
        f"{expected['requests_total']}), errors_by_code {server['errors_by_code']} "
        f"(client expects {expected['errors_by_code']})"
    )
    lines.append(
        f"rpc.stats replies_total {server['replies_total']}, late_outcomes "
        f"{server['late_outcomes']}, closed_by_reason {server['closed_by_reason']}"
    )
    lines += [f"MISMATCH: {m}" for m in report["mismatches"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Options()
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--window", type=int, default=defaults.window, help="requests in flight per connection"
    )
    parser.add_argument(
        "--disconnect",
        type=float,
        default=defaults.disconnect,
        help="chance of a random disconnect before each command (flaky half)",
    )
    parser.add_argument(
        "--deadline", type=float, default=defaults.deadline, help="seconds the whole run may take"
    )
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=660.0, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_main(args.workers, args.lifetime, args.parent or os.getppid())
    options = Options(
        commands=args.commands,
        connections=args.connections,
        seed=args.seed,
        window=args.window,
        disconnect=args.disconnect,
        deadline=args.deadline,
        workers=args.workers,
    )
    report = run_soak(options, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    return 0 if report["ok"] else 1


__all__ = ["Options", "format_report", "run_soak"]

if __name__ == "__main__":
    sys.exit(main())
