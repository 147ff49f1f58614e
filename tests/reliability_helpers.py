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
import os
import re
import select
import shutil
import signal
import socket
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
#: seconds any single wait may take before the test fails


# -- waiting ---------------------------------------------------------------------------------
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
    server.test_release = release  # type: ignore[attr-defined]  # lets a test unblock ``hang``
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


# -- a recording proxy -----------------------------------------------------------------------
class Recorder:
    """A loopback TCP proxy to ``target`` that keeps every byte in each direction.

    ``up`` holds what clients sent, ``down`` what the server sent back.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.up = bytearray()
        self.down = bytearray()
        self._lock = threading.Lock()
        self._listener = listener()
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(
            target=self._accept_loop, daemon=True, name="recorder-accept"
        )
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            conn = accept_within(self._listener, 0.1)
            if conn is None:
                continue
            upstream = socket.create_connection(self.target, timeout=WAIT)
            self._socks += [conn, upstream]
            for src, dst, buf in ((conn, upstream, self.up), (upstream, conn, self.down)):
                thread = threading.Thread(
                    target=self._pump, args=(src, dst, buf), daemon=True, name="recorder-pump"
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        while True:
            ready, _, _ = select.select([src], [], [], 0.1)
            if self._closed.is_set():
                return
            if not ready:
                continue
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self._lock:
                buf += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._accept.join(timeout=WAIT)
        for thread in self._threads:
            thread.join(timeout=WAIT)
        for sock in [*self._socks, self._listener]:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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


def write_device(directory: Path) -> Path:
    """``testdev.yaml`` and its handler module ``testdev_hw.py`` in ``directory``."""
    (directory / "testdev_hw.py").write_text(DEVICE_HW)
    path = directory / "testdev.yaml"
    path.write_text(DEVICE_YAML)
    return path


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
