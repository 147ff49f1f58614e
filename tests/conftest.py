"""Shared fixtures: live servers on 127.0.0.1 (port 0) and raw line-oriented sockets.

No test synchronises by sleeping: tests wait on events, futures and socket reads, each with a
bounded timeout. Where only a counter can tell (e.g. ``rpc.stats``), :func:`wait_until`
re-checks a condition until a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import WAIT, RawConnection, wait_until

from controller import CommandServer


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test's ``statelink`` processes keep their state (keys, run journals) in a temporary
    directory of their own, never in the user's ``~/.local/state/statelink``."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("STATE_DIRECTORY", str(path))
    return path


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


# -- the MQTT broker of the fleet tests (tests/mosquitto.py) ---------------------------------
@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real Mosquitto for the whole test session (anonymous, TCP_NODELAY, loopback, a free
    port). Tests that stop, restart or kill a broker start their own ``Mosquitto``."""
    from mosquitto import Mosquitto

    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


def pytest_report_header(config: pytest.Config) -> str:
    from mosquitto import MISSING, mosquitto_binary

    binary = mosquitto_binary()
    return f"mosquitto: {binary}" if binary else f"!!! {MISSING} !!!"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from mosquitto import MISSING, mosquitto_binary

    if mosquitto_binary() is None:
        terminalreporter.write_sep("!", MISSING, red=True, bold=True)
