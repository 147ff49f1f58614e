"""Test support shared by every test module: bounded waits, raw line sockets, and real
``statelink serve`` processes (started on a free loopback port, address read from the
server's own log line, stopped or killed by the test)."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  #: seconds any single wait in a test may take


def journal_entries(path: Path, sends: bool = False) -> list[dict[str, Any]]:
    """The entries of a run journal file; without the runner's ``send`` entries unless
    ``sends`` (most tests look at what the run recorded; tests/test_durable_journal.py at
    the sends)."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return entries if sends else [e for e in entries if e["event"] != "send"]


class ServeProcess:
    """``statelink serve --port PORT ...`` in the background (PORT 0: a free one; None: no
    ``--port``, for a node that serves MQTT only: ``args`` then give ``--broker``).

    Ready once the server logs its address: ``address`` (``--port``) and, with ``--broker``,
    ``node`` and ``broker`` (from ``serving node NODE on URL``; None without ``--broker``).

    Without ``--state-dir`` in ``args`` the server gets a fresh temporary state dir (removed
    when it stops), never the user's default one, which another server may hold."""

    def __init__(self, *args: str, port: int | None = 0):
        self._state_dir: tempfile.TemporaryDirectory[str] | None = None
        if not any(a == "--state-dir" or a.startswith("--state-dir=") for a in args):
            self._state_dir = tempfile.TemporaryDirectory(prefix="statelink-state-")
            args = (*args, "--state-dir", self._state_dir.name)
        self.args = args
        self.node: str | None = None
        self.broker: str | None = None
        port_args = () if port is None else ("--port", str(port))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "serve", *port_args, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.address: tuple[str, int] = ("", 0)
        self._wait_until_serving(
            tcp=port is not None,
            mqtt=any(a == "--broker" or a.startswith("--broker=") for a in args),
        )

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def _wait_until_serving(self, *, tcp: bool, mqtt: bool) -> None:
        while (tcp and not self.address[1]) or (mqtt and self.node is None):
            line = self.lines.get(timeout=WAIT)
            if not line:
                raise AssertionError(f"statelink serve exited with {self.proc.wait(5)}")
            match = re.search(r"serving on ([\d.]+):(\d+)", line)
            if match:
                self.address = (match.group(1), int(match.group(2)))
            match = re.search(r"serving node (\S+) on (\S+) \(prefix", line)
            if match:
                self.node, self.broker = match.group(1), match.group(2)

    @property
    def server(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def stop(self) -> int:
        """SIGTERM, then wait: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(WAIT)
        self._close_pipe()
        return code

    def kill(self) -> None:
        """SIGKILL: no graceful anything."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self._close_pipe()

    def _close_pipe(self) -> None:
        self._pump_thread.join(WAIT)  # EOF once the process is gone
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._state_dir is not None:
            self._state_dir.cleanup()


def statelink(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m controller ARGS...`` to completion (text output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kwargs,
    )


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Re-check ``predicate`` until it is truthy (returns its value); fail after ``timeout``.

    For state only a counter can show (``rpc.stats``); the pause between checks is an
    ``Event.wait`` of 5 ms, not a synchronising sleep.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.005)


# -- raw sockets -----------------------------------------------------------------------------
class RawConnection:
    """A plain TCP socket speaking lines, with bounded waits."""

    def __init__(
        self,
        address: tuple[str, int],
        timeout: float = WAIT,
        *,
        source: str | None = None,
        rcvbuf: int | None = None,
    ):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""
        self._ids = 0

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_line(self, data: bytes | str) -> None:
        self.send((data.encode() if isinstance(data, str) else data) + b"\n")

    def send_json(self, obj: Any) -> None:
        self.send_line(json.dumps(obj))

    def request(self, method: str, params: Any = None, id: Any = None) -> Any:
        if id is None:
            self._ids += 1
            id = f"raw-{self._ids}"
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            message["params"] = params
        self.send_json(message)
        return id

    def call(self, method: str, params: Any = None, id: Any = None) -> dict[str, Any]:
        """Send a request; return the next line as JSON, which must be its reply."""
        request_id = self.request(method, params, id)
        reply = self.json()
        assert isinstance(reply, dict) and reply.get("id") == request_id, reply
        return reply

    def line(self, timeout: float | None = None) -> bytes:
        """The next line; fails on timeout or when the server closes first."""
        line = self.try_line(timeout)
        if line is None:
            raise AssertionError(f"the server closed the connection; got {self.buffer[:200]!r}")
        return line

    def try_line(self, timeout: float | None = None) -> bytes | None:
        """The next line, or None when the server closed (EOF or reset) before one came."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no complete line in time; got {self.buffer[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(262144)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def json(self, timeout: float | None = None) -> Any:
        return json.loads(self.line(timeout))

    def closed(self, timeout: float | None = None) -> bool:
        """Wait for the server to close (EOF or reset); True if it did within ``timeout``.
        Lines that arrive first are kept in ``buffer``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(262144)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
            self.buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a reset (SO_LINGER 0): the server sees the connection lost at once,
        unlike a plain close, which it may take for a half-close (EOF) and answer first."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
