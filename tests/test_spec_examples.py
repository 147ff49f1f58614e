"""Every example of the JSON-RPC 2.0 specification, section 7, byte for byte over a raw socket.

https://www.jsonrpc.org/specification#examples — the multi-line examples are sent on one line
(the statelink framing), otherwise unchanged. The example methods are registered through the
public API. "No reply" is proven without sleeping: an ``rpc.ping`` sent after the notification
on the same connection must be the very next line.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from controller import CommandServer

WAIT = 10.0


class Calls:
    """What the notification handlers saw (they run on worker threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, tuple[Any, ...]]] = []
        self.event = threading.Event()

    def record(self, name: str, *args: Any) -> None:
        with self.lock:
            self.seen.append((name, args))
        self.event.set()


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def spec_server(make_server, calls: Calls) -> CommandServer:
    server = make_server()

    @server.command("subtract")
    def subtract(minuend, subtrahend):
        return minuend - subtrahend

    @server.command("sum")
    def sum_(*numbers):
        return sum(numbers)

    @server.command("notify_hello")
    def notify_hello(*args):
        calls.record("notify_hello", *args)

    @server.command("notify_sum")
    def notify_sum(*args):
        calls.record("notify_sum", *args)

    @server.command("get_data")
    def get_data():
        return ["hello", 5]

    @server.command("update")
    def update(*args):
        calls.record("update", *args)

    return server


@pytest.fixture
def conn(spec_server, raw):
    return raw(spec_server.address)


def exchange(conn, line: str) -> Any:
    conn.send_line(line)
    return conn.json()


def assert_no_reply(conn) -> None:
    """The next line on ``conn`` is the reply to a ping sent now: nothing came before it."""
    conn.send_line('{"jsonrpc":"2.0","method":"rpc.ping","id":"after"}')
    assert conn.json() == {"jsonrpc": "2.0", "id": "after", "result": "pong"}


INVALID = {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}


def canonical(items: list[Any]) -> list[str]:
    return sorted(json.dumps(item, sort_keys=True) for item in items)


def strip_data(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply without ``error.data`` (statelink adds a reason there; the spec has none)."""
    if "error" in reply:
        reply = dict(reply, error={k: v for k, v in reply["error"].items() if k != "data"})
    return reply


def test_positional_parameters(conn):
    assert exchange(
        conn, '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}'
    ) == {"jsonrpc": "2.0", "result": 19, "id": 1}
    assert exchange(
        conn, '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}'
    ) == {"jsonrpc": "2.0", "result": -19, "id": 2}


def test_named_parameters(conn):
    line = (
        '{"jsonrpc": "2.0", "method": "subtract", '
        '"params": {"subtrahend": 23, "minuend": 42}, "id": 3}'
    )
    assert exchange(conn, line) == {"jsonrpc": "2.0", "result": 19, "id": 3}
    line = (
        '{"jsonrpc": "2.0", "method": "subtract", '
        '"params": {"minuend": 42, "subtrahend": 23}, "id": 4}'
    )
    assert exchange(conn, line) == {"jsonrpc": "2.0", "result": 19, "id": 4}


def test_notifications_get_no_reply(conn, calls):
    conn.send_line('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}')
    conn.send_line('{"jsonrpc": "2.0", "method": "foobar"}')
    assert_no_reply(conn)
    assert calls.event.wait(WAIT)
    assert calls.seen == [("update", (1, 2, 3, 4, 5))]


def test_non_existent_method(conn):
    reply = exchange(conn, '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert reply == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found"},
        "id": "1",
    }


def test_invalid_json(conn):
    reply = exchange(conn, '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert strip_data(reply) == {
        "jsonrpc": "2.0",
        "error": {"code": -32700, "message": "Parse error"},
        "id": None,
    }
    assert_no_reply(conn)  # exactly one reply, and the connection goes on


def test_invalid_request_object(conn):
    reply = exchange(conn, '{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert strip_data(reply) == INVALID
    assert_no_reply(conn)


def test_batch_with_invalid_json(conn):
    line = (
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method"]'
    )
    reply = exchange(conn, line)
    assert strip_data(reply) == {
        "jsonrpc": "2.0",
        "error": {"code": -32700, "message": "Parse error"},
        "id": None,
    }
    assert_no_reply(conn)


def test_empty_array(conn):
    reply = exchange(conn, "[]")
    assert strip_data(reply) == INVALID
    assert_no_reply(conn)


def test_invalid_batch_not_empty(conn):
    reply = exchange(conn, "[1]")
    assert isinstance(reply, list)
    assert [strip_data(item) for item in reply] == [INVALID]
    assert_no_reply(conn)


def test_invalid_batch(conn):
    reply = exchange(conn, "[1,2,3]")
    assert isinstance(reply, list)
    assert [strip_data(item) for item in reply] == [INVALID, INVALID, INVALID]
    assert_no_reply(conn)


def test_mixed_batch(conn, calls):
    line = (
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},'
        '{"foo": "boo"},'
        '{"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},'
        '{"jsonrpc": "2.0", "method": "get_data", "id": "9"}]'
    )
    reply = exchange(conn, line)
    assert isinstance(reply, list)
    expected = [
        {"jsonrpc": "2.0", "result": 7, "id": "1"},
        {"jsonrpc": "2.0", "result": 19, "id": "2"},
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
    ]
    assert canonical([strip_data(item) for item in reply]) == canonical(expected)
    assert_no_reply(conn)  # one array, nothing else
    assert calls.event.wait(WAIT)
    assert calls.seen == [("notify_hello", (7,))]


def test_batch_of_notifications_gets_no_reply_at_all(conn, calls, wait_until):
    line = (
        '[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]'
    )
    conn.send_line(line)
    assert_no_reply(conn)
    # Both notifications ran (the handlers record them on worker threads).
    wait_until(lambda: len(calls.seen) == 2, what="both notifications to run")
    assert sorted(calls.seen) == [("notify_hello", (7,)), ("notify_sum", (1, 2, 4))]


def test_all_examples_on_one_connection_in_one_write(conn):
    """The same examples pipelined in one write: each reply once, matched by id."""
    lines = [
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}',
        '{"jsonrpc": "2.0", "method": "subtract", '
        '"params": {"subtrahend": 23, "minuend": 42}, "id": 3}',
        '{"jsonrpc": "2.0", "method": "foobar"}',
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        '{"jsonrpc": "2.0", "method": "get_data", "id": "9"}',
    ]
    conn.send("\n".join(lines) + "\n")
    replies = {reply["id"]: reply for reply in (conn.json() for _ in range(4))}
    assert replies[1]["result"] == 19
    assert replies[3]["result"] == 19
    assert replies["1"]["error"]["code"] == -32601
    assert replies["9"]["result"] == ["hello", 5]
    assert_no_reply(conn)
