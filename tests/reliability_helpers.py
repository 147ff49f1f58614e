"""Helpers for the security, bounds, fault, fuzz and soak tests (docs/reliability.md).

Everything here talks to 127.0.0.1 only, waits on events / sockets / futures with a bounded
timeout (never sleeps to synchronise) and stops by itself:

- :func:`serve` - an in-process :class:`~controller.server.CommandServer` with the test commands
  (:func:`add_test_commands`), stopped on exit.
- :class:`ChildServer` - a server in a child process (for SIGKILL, restarts and RSS). The child
  runs this file as a script: it dies with its parent (``PR_SET_PDEATHSIG``), when its stdin
  closes, and after ``lifetime`` seconds at the latest.
- :class:`Raw` - a line-oriented raw socket; :class:`Recorder` - a loopback TCP proxy that keeps
  every byte it forwards; :func:`make_cert` - a self-signed certificate made with ``openssl``.

Run as a script (what :class:`ChildServer` does)::

    python tests/reliability_helpers.py --lifetime 60 -- test-server --port 0 --max-frame 65536
    python tests/reliability_helpers.py --lifetime 60 -- cli serve --port 0 --device dev.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import WAIT, wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"


# -- the test commands -----------------------------------------------------------------------
def add_test_commands(server: Any, release: threading.Event | None = None) -> threading.Event:
    """Register the commands the reliability tests use; returns the ``release`` event that
    ``hang`` waits on (set it at teardown so no worker thread stays blocked)."""
    release = release or threading.Event()

    @server.command("echo")
    def echo(value: Any = None) -> Any:
        return value

    @server.command("add")
    def add(a: Any, b: Any) -> Any:
        return a + b

    @server.command("big")
    def big(size: int = 65536) -> str:
        return "x" * min(int(size), 4 << 20)

    @server.command("fail")
    def fail(message: str = "boom") -> None:
        raise RuntimeError(message)

    @server.command("hang")
    def hang(seconds: float = 30.0) -> str:
        """Blocks a worker until ``release`` is set (or ``seconds`` pass)."""
        release.wait(min(float(seconds), 60.0))
        return "released"

    @server.command("raise_system_exit")
    def raise_system_exit() -> None:
        raise SystemExit(3)

    @server.command("raise_keyboard_interrupt")
    def raise_keyboard_interrupt() -> None:
        raise KeyboardInterrupt

    async def araise_system_exit() -> None:
        raise SystemExit(4)

    async def araise_keyboard_interrupt() -> None:
        raise KeyboardInterrupt

    async def asleep(seconds: float = 0.0, value: Any = None) -> Any:
        await asyncio.sleep(min(float(seconds), 60.0))
        return value

    server.add_command("araise_system_exit", araise_system_exit)
    server.add_command("araise_keyboard_interrupt", araise_keyboard_interrupt)
    server.add_command("asleep", asleep)
    return release


@contextlib.contextmanager
def serve(**kwargs: Any) -> Iterator[Any]:
    """A started in-process ``CommandServer(port=0, **kwargs)`` with the test commands."""
    from controller import CommandServer

    kwargs.setdefault("port", 0)
    kwargs.setdefault("grace", 0.5)
    server = CommandServer(**kwargs)
    release = add_test_commands(server)
    server.test_release = release  # lets a test unblock ``hang``
    server.start()
    try:
        yield server
    finally:
        release.set()
        server.stop(grace=0.5)


def stats(address: tuple[str, int], **client_kwargs: Any) -> dict[str, Any]:
    """``rpc.stats`` through a fresh client (which counts as one connection while it asks)."""
    from controller import Client

    with Client(address, reconnect=False, **client_kwargs) as client:
        return client.call("rpc.stats", timeout=WAIT)


def ping_ok(address: tuple[str, int], **client_kwargs: Any) -> bool:
    """A normal client is served: a fresh connection answers ``rpc.ping``."""
    from controller import Client

    with Client(address, reconnect=False, **client_kwargs) as client:
        return client.call("rpc.ping", timeout=WAIT) == "pong"


def error_code(reply: dict[str, Any]) -> int | None:
    error = reply.get("error")
    return error.get("code") if isinstance(error, dict) else None


def listener(host: str = HOST, port: int = 0) -> socket.socket:
    """A listening socket (non-blocking accept is up to the caller)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock


def accept_within(sock: socket.socket, timeout: float) -> socket.socket | None:
    """The next connection on a listening socket, or None if none comes within ``timeout``."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return None
    conn, _ = sock.accept()
    return conn


# -- a fault proxy ---------------------------------------------------------------------------
class FaultProxy:
    """A loopback TCP proxy to ``target`` that the test controls (the network between a
    runner and a server). Each accepted connection gets its own upstream connection and two
    pump threads; what they do with each chunk read is decided per chunk, from the settings
    *now*:

    - pass (the default): forwarded as is;
    - ``delay``: each chunk waits that many seconds (a ``(low, high)`` pair: a seeded random
      time in between) before it is forwarded, in order;
    - ``drop_rate``: each chunk, with that probability (seeded ``random.Random(seed)``), is
      discarded and its connection reset on both sides (random drops);
    - :meth:`drop`: reset every open connection now (both sides see a reset);
    - :meth:`blackhole`: a partition. Every open connection and every new one reads and
      forwards nothing (a new one is accepted but never connected upstream);
    - :meth:`heal`: new connections pass again; the black-holed ones are reset, since their
      byte streams have a gap and cannot resume (what a peer sees when a partition outlasts
      its connection);
    - ``target`` may be changed at any time (a server restarted on another port); a connection
      whose upstream cannot be reached is reset.

    ``accepted`` counts the connections accepted, ``resets`` those the proxy reset.
    With ``record=True`` it keeps every forwarded byte: ``up`` (client to server), ``down``.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        record: bool = False,
        delay: float | tuple[float, float] = 0.0,
        drop_rate: float = 0.0,
        seed: int = 0,
    ):
        self.target = target
        self.record = record
        self.delay = delay
        self.drop_rate = drop_rate
        self.up = bytearray()
        self.down = bytearray()
        self.accepted = 0
        self.resets = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._blackholed = False
        self._links: list[_Link] = []
        self._listener = listener()
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept")
        self._accept.start()

    # -- control ---------------------------------------------------------------------------
    def blackhole(self) -> None:
        """Partition: nothing is forwarded any more, on open connections and new ones."""
        with self._lock:
            self._blackholed = True
            for link in self._links:
                link.blackholed = True

    def heal(self) -> None:
        """End the partition: reset the black-holed connections; new ones pass."""
        with self._lock:
            self._blackholed = False
            dead = [link for link in self._links if link.blackholed]
        for link in dead:
            self._reset(link)

    def drop(self) -> int:
        """Reset every open connection on both sides; the number reset."""
        with self._lock:
            links = list(self._links)
        return sum(self._reset(link) for link in links)

    # -- the pumps -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            conn = accept_within(self._listener, 0.1)
            if conn is None:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(conn)
            with self._lock:
                self.accepted += 1
                link.blackholed = self._blackholed
            if not link.blackholed:
                try:
                    link.upstream = socket.create_connection(self.target, timeout=WAIT)
                    link.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    self._reset(link)
                    continue
            with self._lock:
                self._links.append(link)
            pairs = [(link.client, link.upstream, self.up)]
            if link.upstream is not None:
                pairs.append((link.upstream, link.client, self.down))
            for src, dst, buf in pairs:
                thread = threading.Thread(
                    target=self._pump, args=(link, src, dst, buf), daemon=True, name="proxy-pump"
                )
                self._threads.append(thread)
                thread.start()

    def _chance(self) -> float:
        with self._lock:
            return self._rng.random()

    def _pause(self) -> float:
        delay = self.delay
        if isinstance(delay, tuple):
            with self._lock:
                return self._rng.uniform(*delay)
        return delay

    def _pump(
        self,
        link: _Link,
        src: socket.socket,
        dst: socket.socket | None,
        buf: bytearray,
    ) -> None:
        while not self._closed.is_set() and not link.dead:
            try:
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
            except (OSError, ValueError):  # reset by the peer, or by another pump
                self._reset(link)
                return
            if not data:
                if dst is not None and not link.blackholed:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                return
            if link.blackholed or dst is None:
                continue  # read, forward nothing
            if self.drop_rate and self._chance() < self.drop_rate:
                self._reset(link)
                return
            pause = self._pause()
            if pause > 0 and self._closed.wait(pause):
                return
            if link.blackholed or link.dead:
                continue
            if self.record:
                with self._lock:
                    buf += data
            try:
                dst.sendall(data)
            except OSError:
                self._reset(link)
                return

    def _reset(self, link: _Link) -> bool:
        """Close both sides of ``link`` with a reset (SO_LINGER 0); False if already done."""
        with self._lock:
            if link.dead:
                return False
            link.dead = True
            self.resets += 1
            if link in self._links:
                self._links.remove(link)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()
        return True

    def close(self) -> None:
        self._closed.set()
        self._accept.join(timeout=WAIT)
        for thread in self._threads:
            thread.join(timeout=WAIT)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            for sock in (link.client, link.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Link:
    """One proxied connection: the accepted socket and its upstream (None: black-holed)."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        self.blackholed = False
        self.dead = False


class Recorder(FaultProxy):
    """A :class:`FaultProxy` that only passes and keeps every byte: ``up`` holds what clients
    sent, ``down`` what the server sent back."""

    def __init__(self, target: tuple[str, int]):
        super().__init__(target, record=True)


# -- TLS -------------------------------------------------------------------------------------
def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` / ``127.0.0.1`` made with ``openssl``.

    Skips the calling test when ``openssl`` is not installed.
    """
    import pytest

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def server_tls(cert: Path, key: Path) -> Any:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_tls(ca: Path | None) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(ca) if ca else None)


# -- device configs --------------------------------------------------------------------------
DEVICE_YAML = """\
device: testdev
description: a device for the fault tests
states: [idle, busy, fault]
initial: idle
timeout: 5s
commands:
  ok:
    from: "*"
    handler: testdev_hw:ok
  boom:
    from: [idle]
    running: busy
    to: idle
    handler: testdev_hw:boom
  overrun:
    from: [idle]
    running: busy
    to: idle
    timeout: 300ms
    handler: testdev_hw:overrun
  slow:
    from: [idle]
    running: busy
    to: idle
    timeout: 30s
    handler: testdev_hw:slow
    params:
      seconds: {type: number, min: 0, max: 20, default: 10}
  reset:
    from: [fault]
    to: idle
    handler: testdev_hw:reset
"""

DEVICE_HW = '''\
"""Handlers of the test device."""


def ok(ctx):
    return {"ok": True}


def boom(ctx):
    raise RuntimeError("the motor stalled")


def overrun(ctx):
    ctx.sleep(10)  # returns early (False) once the server's timeout cancels the command
    return {"late": True}


def slow(ctx, seconds=10):
    finished = ctx.sleep(seconds)
    return {"slept": seconds, "finished": finished}


def reset(ctx):
    return {"ok": True}
'''


def write_device(directory: Path, *, slow_cancelled: str | None = None) -> Path:
    """``testdev.yaml`` and its handler module ``testdev_hw.py`` in ``directory``.

    ``slow_cancelled``: the state ``slow`` ends in when cancelled while it runs (its
    ``cancelled:`` key; without it the device faults, as for any command cancelled halfway).
    """
    (directory / "testdev_hw.py").write_text(DEVICE_HW)
    text = DEVICE_YAML
    if slow_cancelled is not None:
        text = text.replace(
            "    handler: testdev_hw:slow\n",
            f"    handler: testdev_hw:slow\n    cancelled: {slow_cancelled}\n",
        )
    path = directory / "testdev.yaml"
    path.write_text(text)
    return path


COUNTING_YAML = """\
device: {name}
description: a device whose handlers append every invocation to executions.jsonl
states: [idle, busy, fault]
initial: idle
fault: fault
timeout: 10s
commands:
  work:
    from: [idle]
    running: busy
    to: idle
    handler: counting_hw:work
    params:
      seconds: {{type: number, min: 0, max: 30, default: 0}}
      size: {{type: integer, min: 0, max: 20000000, default: 0}}
      depth: {{type: integer, min: 0, max: 100, default: 0}}
      tag: {{type: string, default: ""}}
  quick:
    from: [idle]
    running: busy
    to: idle
    timeout: 300ms
    handler: counting_hw:work
    params:
      tag: {{type: string, default: ""}}
  mark:
    from: "*"
    handler: counting_hw:work
    params:
      tag: {{type: string, default: ""}}
  reset:
    from: [fault]
    to: idle
    handler: counting_hw:work
"""

COUNTING_HW = '''\
"""Handlers of the counting test device: every invocation appends a "start" line, and every
return an "end" line, to executions.jsonl next to this file (one O_APPEND write each)."""

import json
import os
import uuid
from pathlib import Path

LOG = Path(__file__).with_name("executions.jsonl")


def _append(record):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(record) + "\\n").encode())
    finally:
        os.close(fd)


def work(ctx, seconds=0, size=0, depth=0, tag=""):
    execution = uuid.uuid4().hex
    head = {"device": ctx.device, "command": ctx.command, "tag": tag, "execution": execution}
    _append({"event": "start", **head})
    finished = ctx.sleep(seconds) if seconds else True
    _append({"event": "end", "finished": finished, **head})
    if size:
        return "x" * size
    if depth:
        value = execution
        for _ in range(depth):
            value = [value]
        return value
    return {"execution": execution, "tag": tag, "finished": finished}
'''


def write_counting_device(directory: Path, name: str = "counter") -> Path:
    """``NAME.yaml`` (commands ``work``, ``quick`` (300 ms timeout), ``mark`` (from "*"),
    ``reset``) and the handler module ``counting_hw.py`` in ``directory``; every handler
    invocation is logged (see :func:`executions`). Several devices may share a directory."""
    (directory / "counting_hw.py").write_text(COUNTING_HW)
    path = directory / f"{name}.yaml"
    path.write_text(COUNTING_YAML.format(name=name))
    return path


def executions(directory: Path, event: str = "start", **match: Any) -> list[dict[str, Any]]:
    """The logged invocations (``event`` "start") or returns ("end") of the counting devices
    in ``directory``, in order, filtered by ``match`` (e.g. ``command="work"``)."""
    path = directory / "executions.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        r for r in records if r["event"] == event and all(r.get(k) == v for k, v in match.items())
    ]


# -- child processes -------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB, from /proc/PID/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))


class ChildServer:
    """A statelink server in a child process; see the module docstring for how it ends.

    ``mode`` is ``"test-server"`` (a ``CommandServer`` with :func:`add_test_commands`) or
    ``"cli"`` (``statelink ARGS``). Its output goes to ``log`` (a file); ``wait_for`` reads it.
    A ``serve`` without ``--state-dir`` gets ``LOG.state`` next to the log (never the user's
    default state dir), so a child restarted with the same log finds its keys again.
    """

    READY = re.compile(r"(?:READY|serving on) (\d+\.\d+\.\d+\.\d+):(\d+)")

    def __init__(
        self,
        mode: str,
        args: list[str],
        log: Path,
        *,
        lifetime: float = 90.0,
        env: dict[str, str] | None = None,
    ):
        self.mode = mode
        if (
            mode == "cli"
            and args[:1] == ["serve"]
            and not any(a == "--state-dir" or a.startswith("--state-dir=") for a in args)
        ):
            args = [*args, "--state-dir", str(log.with_suffix(".state"))]
        self.args = args
        self.log = log
        self.lifetime = lifetime
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: tuple[str, int] = (HOST, 0)
        self._offset = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> ChildServer:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--lifetime",
            str(self.lifetime),
            "--parent",
            str(os.getpid()),
            "--",
            self.mode,
            *self.args,
        ]
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
            )
        match = self.wait_for(self.READY, timeout)
        self.address = (match.group(1), int(match.group(2)))
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")[self._offset :]

    def wait_for(self, pattern: re.Pattern[str], timeout: float = WAIT) -> re.Match[str]:
        """Wait until the child's output (since this start) matches ``pattern``."""
        assert self.proc is not None

        def found() -> re.Match[str] | None:
            match = pattern.search(self.output())
            if match is None and self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"the child server exited ({self.proc.returncode}):\n" + self.output()[-3000:]
                )
            return match

        return wait_until(found, timeout, f"{pattern.pattern!r} in the child's output")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=WAIT)
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def stop(self) -> None:
        """Close its stdin (it exits by itself), else SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=WAIT)

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- the child side --------------------------------------------------------------------------
def _die_with_parent(parent: int, lifetime: float) -> None:
    """Make sure this process ends: with its parent, on stdin EOF, after ``lifetime``."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(2)
    timer = threading.Timer(lifetime, os._exit, (3,))
    timer.daemon = True
    timer.start()

    def watch_stdin() -> None:
        with contextlib.suppress(OSError):
            while sys.stdin.buffer.read(4096):
                pass
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True, name="stdin-watch").start()


def _test_server_main(argv: list[str]) -> int:
    from controller import CommandServer, Limits

    parser = argparse.ArgumentParser(prog="test-server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=10.0)
    for name, value in vars(Limits()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    limits = Limits(**{name: getattr(args, name) for name in vars(Limits())})
    server = CommandServer(
        HOST, args.port, workers=args.workers, timeout=args.timeout, limits=limits, grace=0.5
    )
    add_test_commands(server)
    server.start()
    host, port = server.address
    print(f"READY {host}:{port}", flush=True)
    threading.Event().wait()  # until stdin closes, the parent dies or the lifetime ends
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or ""))
    parser.add_argument("--lifetime", type=float, default=60.0)
    parser.add_argument("--parent", type=int, default=os.getppid())
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    _die_with_parent(args.parent, args.lifetime)
    mode, rest = rest[0], rest[1:]
    if mode == "test-server":
        return _test_server_main(rest)
    if mode == "cli":
        from controller.cli import main as cli_main

        return cli_main(rest)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
