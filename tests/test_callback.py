"""Callback delivery over real sockets, as docs/protocol.md ("Callback delivery") states it:
the server connects back at ``rpc.hello`` and answers it once the link is up (or says why it
is not), and then every reply of that connection goes over the link."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from support import WAIT

from statemachines import errorkinds as ek


@pytest.fixture
def back() -> Iterator[socket.socket]:
    """The client's listening socket for the connect-back, opened before anything is sent."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    yield sock
    sock.close()


def _hello(conn: Any, port: int) -> dict[str, Any]:
    reply = conn.call("rpc.hello", {"client": "raw", "callback_port": port}, id="hello")
    result: dict[str, Any] = reply["result"]
    return result


def _lines(link: socket.socket) -> Any:
    link.settimeout(WAIT)
    return link.makefile("rb")


def test_a_client_that_accepts_the_connect_back_before_sending_does_not_deadlock(server, raw, back):
    """The raw two-socket client: listen, rpc.hello, accept the connect-back, then send."""
    conn = raw(server.address)
    port = back.getsockname()[1]
    conn.request("rpc.hello", {"callback_port": port}, id="hello")
    link, (host, _) = back.accept()  # before any other request: the server connected at hello
    with link:
        assert host == "127.0.0.1"
        hello = conn.json()
        assert hello["id"] == "hello"
        assert hello["result"]["callback"] == {"host": "127.0.0.1", "port": port}
        assert "callback_error" not in hello["result"]
        conn.request("add", [2, 3], id="sum")
        assert json.loads(_lines(link).readline()) == {"jsonrpc": "2.0", "id": "sum", "result": 5}


def test_the_hello_reply_comes_once_the_link_is_up(server, raw, back):
    conn = raw(server.address)
    _hello(conn, back.getsockname()[1])
    back.setblocking(False)  # the connect-back is already waiting to be accepted
    link, _ = back.accept()
    link.close()


def test_hello_reports_a_refused_callback_port(server, raw):
    refusing = socket.create_server(("127.0.0.1", 0))
    port = refusing.getsockname()[1]
    refusing.close()  # nothing listens there: the connect is refused
    conn = raw(server.address)
    hello = _hello(conn, port)
    assert hello["callback"] is None
    assert hello["callback_error"].startswith(f"cannot connect to 127.0.0.1:{port}: ")
    # the replies then come on the request connection
    assert conn.call("add", [1, 1], id="a")["result"] == 2
    bad = conn.call("add", None, id="b")  # an error reply too ("add" needs its params)
    assert ek.kind_of(bad["error"]["code"]) == "invalid_params"


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "1.0", "id": "m", "method": "rpc.ping"},
        {"jsonrpc": "2.0", "id": "m", "method": "rpc.ping", "params": None},
        {"jsonrpc": "2.0", "id": "m"},
    ],
    ids=["wrong-jsonrpc", "null-params", "no-method"],
)
def test_a_malformed_request_with_a_known_id_is_answered_over_the_link(server, raw, back, message):
    conn = raw(server.address)
    _hello(conn, back.getsockname()[1])
    link, _ = back.accept()
    with link:
        conn.send_json(message)
        reply = json.loads(_lines(link).readline())
        assert reply["id"] == "m"
        assert reply["error"]["code"] == ek.INVALID_REQUEST
        # nothing went on the request connection: its next line answers an unreadable one
        conn.send_line(b"{not json")
        assert ek.kind_of(conn.json()["error"]["code"]) == "parse_error"


def test_batch_replies_go_over_the_link_but_a_batch_with_hello_does_not(server, raw, back):
    conn = raw(server.address)
    port = back.getsockname()[1]
    _hello(conn, port)
    link, _ = back.accept()
    with link:
        lines = _lines(link)
        conn.send_json(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "add", "params": [1, 2]},
                {"jsonrpc": "2.0", "id": 2, "method": "rpc.ping"},
            ]
        )
        assert sorted(json.loads(lines.readline()), key=lambda r: r["id"]) == [
            {"jsonrpc": "2.0", "id": 1, "result": 3},
            {"jsonrpc": "2.0", "id": 2, "result": "pong"},
        ]
        conn.send_json(
            [
                {"jsonrpc": "2.0", "id": 3, "method": "rpc.hello", "params": {"client": "x"}},
                {"jsonrpc": "2.0", "id": 4, "method": "rpc.ping"},
            ]
        )
        replies = sorted(conn.json(), key=lambda r: r["id"])
        assert [r["id"] for r in replies] == [3, 4]
        assert replies[0]["result"]["callback"] == {"host": "127.0.0.1", "port": port}
