"""Shared fixtures: live servers on 127.0.0.1 (port 0) and raw line-oriented sockets.

No test synchronises by sleeping: tests wait on events, futures and socket reads, each with a
bounded timeout. Where only a counter can tell (e.g. ``rpc.stats``), :func:`wait_until`
re-checks a condition until a deadline.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller import CommandServer

#: seconds any single wait in a test may take before the test fails
WAIT = 10.0


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Re-check ``predicate`` until it is truthy (returns its value) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.005)


class RawConnection:
    """A plain TCP socket speaking lines: send bytes/JSON, read one line with a timeout."""

    def __init__(self, address: tuple[str, int], timeout: float = WAIT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._buffer = b""
        self._ids = 0

    def send(self, data: bytes | str) -> None:
        """Send raw bytes (str is UTF-8 encoded); nothing is appended."""
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_line(self, data: bytes | str) -> None:
        """Send ``data`` plus ``\\n``."""
        self.send((data.encode() if isinstance(data, str) else data) + b"\n")

    def send_json(self, obj: Any) -> None:
        self.send_line(json.dumps(obj))

    def request(self, method: str, params: Any = None, id: Any = None) -> Any:
        """Send a request (an automatic id when ``id`` is None); return the id used."""
        if id is None:
            self._ids += 1
            id = f"raw-{self._ids}"
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            message["params"] = params
        self.send_json(message)
        return id

    def call(self, method: str, params: Any = None, id: Any = None) -> dict[str, Any]:
        """Send a request and return the next line as JSON (which must be its reply)."""
        request_id = self.request(method, params, id)
        reply = self.json()
        assert isinstance(reply, dict) and reply.get("id") == request_id, reply
        return reply

    def line(self, timeout: float | None = None) -> bytes:
        """The next line (with its ``\\n``); fails on timeout or when the server closes first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no complete line within the timeout; got {self._buffer!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"the server closed the connection; got {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def json(self, timeout: float | None = None) -> Any:
        return json.loads(self.line(timeout))

    def closed(self, timeout: float | None = None) -> bool:
        """Wait for the server to close: True on EOF/reset with no unread line left."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
            if not chunk:
                return not self._buffer.strip()
            self._buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """:func:`wait_until` as a fixture (test modules do not import conftest)."""
    return wait_until


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that blocked handlers wait on; set at teardown so no worker stays blocked."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def make_server(release: threading.Event) -> Iterator[Callable[..., CommandServer]]:
    """``make_server(**kwargs)``: a started ``CommandServer(port=0, ...)``, stopped at teardown.

    Register commands before the first request; the server is already listening.
    """
    servers: list[CommandServer] = []

    def make(**kwargs: Any) -> CommandServer:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("grace", 1.0)
        server = CommandServer(**kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    release.set()  # let blocked handlers finish so stop() does not wait for them
    for server in servers:
        server.stop(grace=0.5)


@pytest.fixture
def server(make_server: Callable[..., CommandServer]) -> CommandServer:
    """A started ``CommandServer(port=0)`` with a few commands; stopped at teardown."""
    srv = make_server()

    @srv.command("add")
    def add(a, b):
        """Add two numbers."""
        return a + b

    @srv.command("echo")
    def echo(value=None):
        return value

    return srv


@pytest.fixture
def raw(request: pytest.FixtureRequest) -> Iterator[Callable[..., RawConnection]]:
    """``raw(address=None)``: a :class:`RawConnection` to ``address``, by default to the
    ``server`` fixture's server (started on first use). Closed at teardown."""
    conns: list[RawConnection] = []

    def open_raw(address: tuple[str, int] | None = None, timeout: float = WAIT) -> RawConnection:
        if address is None:
            address = request.getfixturevalue("server").address
        conn = RawConnection(address, timeout)
        conns.append(conn)
        return conn

    yield open_raw
    for conn in conns:
        conn.close()
