"""The servers the benchmark measures, each run as its own process.

``python -m bench.references KIND [--port 0] [--cpu N] [--workers N] ...`` prints ``READY <port>``
once it listens on 127.0.0.1, then serves until its standard input closes (or ``--max-seconds``
pass: every server stops by itself).

KIND is one of

* ``callback``  reference 1, the original design: accept, one new thread per command, and the
  reply goes back on a *new* connection to the port the client listens on (announced once with
  ``rpc.hello {"callback_port": P}``, answered on the request connection);
* ``threading`` reference 2: ``socketserver.ThreadingTCPServer``, one thread per connection, one
  request per line;
* ``asyncio``   reference 3: an ``asyncio`` streams server (blocking methods go to a thread pool
  of ``--workers`` threads through ``run_in_executor``);
* ``statelink`` the server under test: a :class:`controller.CommandServer` with the benchmark
  commands registered.

Every reference does the same JSON-RPC work per request as statelink must: parse the JSON line,
check it is a request, dispatch by method name, call the handler, build the reply object and
serialise it (compact separators, one line).

Benchmark methods (the same names and results on every server):

* ``bench.echo(value)``  returns ``value``. On statelink an ``async def`` (runs on the I/O loop);
* ``bench.echo_sync(value)`` the same as a plain ``def`` (statelink: through the worker pool);
  on the references it is the same function as ``bench.echo``;
* ``bench.sleep()``  blocks for 10 ms (like GPIO or I2C I/O), returns ``"slept"``;
* ``bench.step(n)``  returns ``{"ok": true, "n": n}`` (the workflow benchmark, S4).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
SLEEP_SECONDS = 0.010
BACKLOG = 1024


def echo(value: Any = None) -> Any:
    return value


def sleep_10ms() -> str:
    time.sleep(SLEEP_SECONDS)
    return "slept"


def step(n: Any = 0) -> dict[str, Any]:
    return {"ok": True, "n": n}


#: name -> (function, blocks?)  (the dispatch table of the references)
METHODS: dict[str, tuple[Callable[..., Any], bool]] = {
    "bench.echo": (echo, False),
    "bench.echo_sync": (echo, False),
    "bench.sleep": (sleep_10ms, True),
    "bench.step": (step, False),
}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def _error(rid: Any, code: int, message: str) -> bytes:
    return (
        _dumps({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}) + "\n"
    ).encode()


class Job:
    """One parsed request: what to call and how to answer."""

    __slots__ = ("args", "blocking", "func", "kwargs", "notification", "rid")

    def __init__(
        self, rid: Any, func: Callable[..., Any], params: Any, blocking: bool, notification: bool
    ):
        self.rid = rid
        self.func = func
        self.blocking = blocking
        self.notification = notification
        if isinstance(params, list):
            self.args, self.kwargs = params, {}
        elif isinstance(params, dict):
            self.args, self.kwargs = [], params
        else:
            self.args, self.kwargs = [], {}

    def call(self) -> Any:
        return self.func(*self.args, **self.kwargs)

    def reply(self, result: Any) -> bytes | None:
        if self.notification:
            return None
        return (_dumps({"jsonrpc": "2.0", "id": self.rid, "result": result}) + "\n").encode()

    def run(self) -> bytes | None:
        """Call the handler and serialise its reply (or its error)."""
        try:
            result = self.call()
        except TypeError as exc:
            return None if self.notification else _error(self.rid, -32602, f"Invalid params: {exc}")
        except Exception as exc:
            if self.notification:
                return None
            return _error(self.rid, -32000, f"{type(exc).__name__}: {exc}")
        return self.reply(result)


def parse(line: bytes) -> Job | bytes | None:
    """A :class:`Job`, or the error reply to send at once, or None (blank line)."""
    line = line.strip()
    if not line:
        return None
    try:
        req = _loads(line)
    except ValueError:
        return _error(None, -32700, "Parse error")
    if (
        not isinstance(req, dict)
        or req.get("jsonrpc") != "2.0"
        or not isinstance(req.get("method"), str)
    ):
        return _error(req.get("id") if isinstance(req, dict) else None, -32600, "Invalid Request")
    rid = req.get("id")
    entry = METHODS.get(req["method"])
    if entry is None:
        return None if "id" not in req else _error(rid, -32601, "Method not found")
    return Job(rid, entry[0], req.get("params"), entry[1], "id" not in req)


def handle_line(line: bytes) -> bytes | None:
    """The whole JSON-RPC work of one line: parse, dispatch, call, serialise."""
    job = parse(line)
    if job is None or isinstance(job, bytes):
        return job
    return job.run()


# --- reference 1: a thread per command, replies on a new connection back to the client ---------


class CallbackServer:
    """The original design. Unbounded by construction (a thread per command)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server((HOST, port), backlog=BACKLOG)
        self.port = self.sock.getsockname()[1]

    def serve_forever(self) -> None:
        while True:
            conn, peer = self.sock.accept()
            threading.Thread(target=self._read, args=(conn, peer[0]), daemon=True).start()

    def _read(self, conn: socket.socket, host: str) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        callback_port: int | None = None
        lock = threading.Lock()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if b"rpc.hello" in line:
                    try:
                        req = _loads(line)
                        callback_port = int(req["params"]["callback_port"])
                        reply = (
                            _dumps(
                                {
                                    "jsonrpc": "2.0",
                                    "id": req.get("id"),
                                    "result": {"callback": callback_port},
                                }
                            )
                            + "\n"
                        ).encode()
                    except (ValueError, KeyError, TypeError):
                        reply = _error(None, -32602, "rpc.hello needs callback_port")
                    with lock:
                        conn.sendall(reply)
                    continue
                threading.Thread(
                    target=self._answer, args=(line, host, callback_port, conn, lock), daemon=True
                ).start()

    @staticmethod
    def _answer(
        line: bytes, host: str, port: int | None, conn: socket.socket, lock: threading.Lock
    ) -> None:
        reply = handle_line(line)
        if reply is None:
            return
        try:
            if port is None:  # no callback announced: answer where the request came from
                with lock:
                    conn.sendall(reply)
                return
            # a plain socket, not create_connection: no getaddrinfo per reply
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as back:
                back.settimeout(5.0)
                back.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                back.connect((host, port))
                back.sendall(reply)
        except OSError:
            pass  # the client went away


# --- reference 2: socketserver.ThreadingTCPServer ----------------------------------------------


def make_threading_server(port: int) -> Any:
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def setup(self) -> None:
            super().setup()
            # asyncio (reference 3 and statelink) sets TCP_NODELAY on every connection
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def handle(self) -> None:
            write = self.wfile.write
            for line in self.rfile:
                reply = handle_line(line)
                if reply is not None:
                    write(reply)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = BACKLOG

    server = Server((HOST, port), Handler)
    server.port = server.server_address[1]  # type: ignore[attr-defined]
    return server


# --- reference 3: asyncio streams ----------------------------------------------------------------


def run_asyncio_server(port: int, workers: int, ready: Callable[[int], None]) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ref3-worker")

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                job = parse(line)
                if job is None:
                    continue
                if isinstance(job, bytes):
                    reply: bytes | None = job
                elif job.blocking:
                    reply = await loop.run_in_executor(pool, job.run)
                else:
                    reply = job.run()
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(client, HOST, port, backlog=BACKLOG)
        ready(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- statelink ---------------------------------------------------------------------------------


def make_statelink_server(
    port: int,
    workers: int,
    max_inflight: int | None,
    max_connections: int | None,
    devices: list[str] | None = None,
    state_dir: str | None = None,
) -> Any:
    from controller import CommandServer, Limits

    limits = Limits()
    if max_inflight is not None:
        limits.max_inflight = max_inflight
    if max_connections is not None:
        limits.max_connections = max_connections
    server = CommandServer(
        HOST, port, workers=workers, limits=limits, name="statelink-bench", state_dir=state_dir
    )

    @server.command("bench.echo")
    async def echo_async(value: Any = None) -> Any:
        """Trivial command on the I/O loop (async def)."""
        return value

    server.add_command(
        "bench.echo_sync", echo, description="Trivial command through the worker pool (plain def)."
    )
    server.add_command("bench.sleep", sleep_10ms, description="Blocks 10 ms on a worker.")

    @server.command("bench.step")
    async def step_async(n: Any = 0) -> dict[str, Any]:
        """One workflow step (S4)."""
        return {"ok": True, "n": n}

    if devices:
        from controller.devices import add_device
        from statemachines.device import load_device

        for path in devices:  # simulated: gpiozero's mock pins
            add_device(server, load_device(path), simulate=True)
    return server


# --- process entry point -----------------------------------------------------------------------

KINDS = ("callback", "threading", "asyncio", "statelink")


def _announce(port: int) -> None:
    sys.stdout.write(f"READY {port} {os.getpid()}\n")
    sys.stdout.flush()


def _exit_on_stdin_eof(max_seconds: float) -> None:
    """Stop this process when the parent closes our stdin (or dies), or after max_seconds."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except (OSError, ValueError):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    timer = threading.Timer(max_seconds, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.references",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help="statelink worker pool size / asyncio executor threads",
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="statelink Limits.max_inflight (default: the server's default)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="statelink Limits.max_connections (default: the server's default)",
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        help="statelink: also serve this device config, simulated",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="statelink: keep the idempotency keys of device commands here (default: in memory)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=900.0, help="stop by itself after this many seconds"
    )
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    _exit_on_stdin_eof(args.max_seconds)

    if args.kind == "callback":
        server = CallbackServer(args.port)
        _announce(server.port)
        server.serve_forever()
    elif args.kind == "threading":
        server = make_threading_server(args.port)
        _announce(server.port)
        server.serve_forever()
    elif args.kind == "asyncio":
        run_asyncio_server(args.port, args.workers, _announce)
    else:
        server = make_statelink_server(
            args.port,
            args.workers,
            args.max_inflight,
            args.max_connections,
            args.device,
            args.state_dir,
        )
        server.start()
        _announce(server.address[1])
        threading.Event().wait()  # the stdin watcher or the timer ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
