"""CommandServer over real TCP sockets on 127.0.0.1 (port 0), spoken to with raw lines.

Blocked handlers wait on the ``release`` event (set at teardown), never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading

import pytest
from support import WAIT

from controller import CommandServer, Limits
from controller.errors import DeviceFaultError, NotAllowedError
from statemachines import errorkinds as ek


def result_of(reply):
    assert "error" not in reply, reply
    return reply["result"]


def error_of(reply, code):
    assert "error" in reply, reply
    assert reply["error"]["code"] == code, reply
    return reply["error"]


def stats(conn):
    return result_of(conn.call("rpc.stats"))


# -- concurrency --------------------------------------------------------------------------


def test_hundred_clients_at_once(server, raw):
    n = 100
    conns = [raw() for _ in range(n)]
    barrier = threading.Barrier(n)
    answers: dict[int, object] = {}
    failures: list[BaseException] = []

    def client(i: int) -> None:
        try:
            conn = conns[i]
            barrier.wait(WAIT)
            conn.send_json({"jsonrpc": "2.0", "id": i, "method": "add", "params": [i, 1000]})
            reply = conn.json()
            answers[reply["id"]] = reply["result"]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not failures, failures[:3]
    assert answers == {i: i + 1000 for i in range(n)}
    assert stats(raw())["connections_total"] >= n + 1


def test_slow_command_never_delays_ping(make_server, raw, release):
    server = make_server()
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(10)  # a 10 s command; released at teardown
        return "slow done"

    a = raw(server.address)
    b = raw(server.address)
    a.request("slow", id="slow")
    assert started.wait(WAIT)
    # another client, and the same connection, are answered while it runs
    for i in range(20):
        assert b.call("rpc.ping", id=i) == {"jsonrpc": "2.0", "id": i, "result": "pong"}
        assert a.call("rpc.ping", id=i) == {"jsonrpc": "2.0", "id": i, "result": "pong"}
    release.set()
    assert a.json() == {"jsonrpc": "2.0", "id": "slow", "result": "slow done"}


def test_many_in_flight_on_one_connection_answered_as_they_finish(make_server, raw):
    server = make_server()
    gates: dict[int, asyncio.Event] = {}

    @server.command("gate", timeout=60)
    async def gate(n):
        event = gates.setdefault(n, asyncio.Event())
        await event.wait()
        return n * 10

    def open_gate(n: int) -> None:
        gates.setdefault(n, asyncio.Event()).set()

    conn = raw(server.address)
    n = 200
    conn.send(
        b"".join(
            json.dumps({"jsonrpc": "2.0", "id": i, "method": "gate", "params": [i]}).encode()
            + b"\n"
            for i in range(n)
        )
    )
    # all 200 are in flight at once
    assert stats(conn)["requests_in_flight"] == n + 1  # and rpc.stats itself
    order = list(range(n))
    random.Random(7).shuffle(order)
    for i in order:
        server.call_soon(open_gate, i)
        assert conn.json() == {"jsonrpc": "2.0", "id": i, "result": i * 10}


def test_many_in_flight_sync_commands_matched_by_id(make_server, raw):
    server = make_server(workers=4)

    @server.command("square")
    def square(x):
        return x * x

    conn = raw(server.address)
    n = 200
    conn.send(
        b"".join(
            json.dumps(
                {"jsonrpc": "2.0", "id": f"q{i}", "method": "square", "params": [i]}
            ).encode()
            + b"\n"
            for i in range(n)
        )
    )
    replies = [conn.json() for _ in range(n)]
    assert {r["id"]: r["result"] for r in replies} == {f"q{i}": i * i for i in range(n)}


# -- framing and malformed input ----------------------------------------------------------


def test_frame_limit_closes_only_that_connection(make_server, raw):
    server = make_server(limits=Limits(max_frame=1024))
    other = raw(server.address)
    assert result_of(other.call("rpc.ping")) == "pong"
    bad = raw(server.address)
    bad.send(b'{"jsonrpc":"2.0","id":1,"method":"rpc.ping","params":["' + b"x" * 1100 + b'"]}\n')
    reply = bad.json()
    error = error_of(reply, ek.INVALID_REQUEST)
    assert reply["id"] is None
    assert "1024" in error["message"]
    assert error["data"] == {"max_frame": 1024}
    assert bad.closed()
    assert result_of(other.call("rpc.ping")) == "pong"
    assert stats(other)["closed_by_reason"].get("frame_limit") == 1


def test_frame_limit_without_newline(make_server, raw):
    server = make_server(limits=Limits(max_frame=1024))
    bad = raw(server.address)
    bad.send(b"y" * 1026)  # no newline at all
    error = error_of(bad.json(), ek.INVALID_REQUEST)
    assert "1024" in error["message"]
    assert bad.closed()


def test_line_exactly_at_the_frame_limit_is_served(make_server, raw):
    server = make_server(limits=Limits(max_frame=1024))

    @server.command("echo")
    def echo(value):
        return value

    conn = raw(server.address)
    head, tail = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":["', b'"]}'
    line = head + b"z" * (1024 - len(head) - len(tail)) + tail
    assert len(line) == 1024
    conn.send(line + b"\r\n")
    assert result_of(conn.json()) == "z" * (1024 - len(head) - len(tail))


def test_malformed_input_mid_stream(raw):
    conn = raw()
    conn.send(
        b'{"jsonrpc":"2.0","id":1,"method":"rpc.ping"}\n'
        b'{"jsonrpc":"2.0","id":2,"method":\n'
        b'{"jsonrpc":"2.0","id":3,"method":"\xff\xfe"}\n'
        b"\r\n"
        b'{"jsonrpc":"2.0","id":4,"method":"add","params":[3,4]}\r\n'
    )
    assert conn.json() == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    for _ in range(2):
        reply = conn.json()
        error_of(reply, ek.PARSE_ERROR)
        assert reply["id"] is None
    assert conn.json() == {"jsonrpc": "2.0", "id": 4, "result": 7}


def test_request_split_across_writes(raw):
    conn = raw()
    data = b'{"jsonrpc":"2.0","id":"split","method":"add","params":[20,22]}\n'
    for i in range(len(data)):
        conn.send(data[i : i + 1])
    assert conn.json() == {"jsonrpc": "2.0", "id": "split", "result": 42}


def test_invalid_request_echoes_a_valid_id(raw):
    conn = raw()
    conn.send_json({"jsonrpc": "2.0", "id": 9, "method": "add", "params": "nope"})
    reply = conn.json()
    error_of(reply, ek.INVALID_REQUEST)
    assert reply["id"] == 9


def test_response_sent_to_the_server_is_invalid(raw):
    conn = raw()
    conn.send_json({"jsonrpc": "2.0", "id": 5, "result": 1})
    reply = conn.json()
    assert (
        error_of(reply, ek.INVALID_REQUEST)["data"]["reason"]
        == "the server does not take responses"
    )
    assert reply["id"] == 5


# -- params -------------------------------------------------------------------------------


def test_positional_and_named_params(server, raw):
    conn = raw()
    assert result_of(conn.call("add", [2, 3])) == 5
    assert result_of(conn.call("add", {"a": 2, "b": 3})) == 5
    assert result_of(conn.call("add", {"b": "x", "a": "y"})) == "yx"
    assert result_of(conn.call("echo")) is None
    assert result_of(conn.call("echo", {"value": [1, {"k": None}]})) == [1, {"k": None}]


@pytest.mark.parametrize(
    "params, problem",
    [
        ([1], "missing a required argument: 'b'"),
        ([1, 2, 3], "too many positional arguments"),
        ({"a": 1}, "missing a required argument: 'b'"),
        ({"a": 1, "b": 2, "c": 3}, "unexpected keyword argument 'c'"),
        (None, "missing a required argument: 'a'"),
    ],
)
def test_params_mismatch_is_invalid_params(raw, params, problem):
    conn = raw()
    error = error_of(conn.call("add", params), ek.INVALID_PARAMS)
    assert problem in error["message"]
    assert problem in error["data"]["reason"]


def test_unknown_method(raw):
    reply = raw().call("no.such.method", [1])
    assert error_of(reply, ek.METHOD_NOT_FOUND)["message"] == "Method not found"


def test_rpc_names_are_reserved(server):
    with pytest.raises(ValueError, match="reserved"):
        server.add_command("rpc.mine", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        server.add_command("add", lambda: None)


# -- handlers -----------------------------------------------------------------------------


def test_async_handlers(make_server, raw):
    server = make_server()

    @server.command("async_add")
    async def async_add(a, b=10):
        await asyncio.sleep(0)
        return a + b

    @server.command("async_fail")
    async def async_fail():
        raise KeyError("missing")

    @server.command("async_not_allowed")
    async def async_not_allowed():
        raise NotAllowedError("door is open", {"state": "open"})

    conn = raw(server.address)
    assert result_of(conn.call("async_add", [1])) == 11
    assert result_of(conn.call("async_add", {"a": 1, "b": 2})) == 3
    error = error_of(conn.call("async_fail"), ek.DEVICE_FAULT)
    assert error["data"] == {"exception": "KeyError", "message": "'missing'"}
    error = error_of(conn.call("async_not_allowed"), ek.NOT_ALLOWED)
    assert error == {"code": ek.NOT_ALLOWED, "message": "door is open", "data": {"state": "open"}}


def test_handler_raising_gives_device_fault_without_traceback(server, raw):
    @server.command("broken")
    def broken():
        raise ValueError("sensor 3 unplugged")

    @server.command("typed")
    def typed():
        raise DeviceFaultError("motor stalled", {"motor": 2})

    conn = raw()
    conn.request("broken", id=1)
    line = conn.line()
    assert b"Traceback" not in line and b"File " not in line
    error = error_of(json.loads(line), ek.DEVICE_FAULT)
    assert "ValueError" in error["message"] and "sensor 3 unplugged" in error["message"]
    assert error["data"] == {"exception": "ValueError", "message": "sensor 3 unplugged"}
    error = error_of(conn.call("typed"), ek.DEVICE_FAULT)
    assert error == {"code": ek.DEVICE_FAULT, "message": "motor stalled", "data": {"motor": 2}}
    # the server goes on
    assert result_of(conn.call("add", [1, 1])) == 2


def test_non_json_result_is_an_internal_error(server, raw):
    @server.command("weird")
    def weird():
        return object()

    @server.command("nan")
    def nan():
        return float("nan")

    conn = raw()
    assert "not JSON" in error_of(conn.call("weird"), ek.INTERNAL_ERROR)["message"]
    assert "not JSON" in error_of(conn.call("nan"), ek.INTERNAL_ERROR)["message"]
    assert result_of(conn.call("rpc.ping")) == "pong"


def test_timeout_is_answered_once_and_the_late_result_dropped(
    make_server, raw, release, wait_until
):
    server = make_server()
    finished = threading.Event()

    @server.command("stuck", timeout=0.2)
    def stuck():
        release.wait(WAIT)
        finished.set()
        return "too late"

    conn = raw(server.address)
    reply = conn.call("stuck", id="s")
    error = error_of(reply, ek.TIMEOUT)
    assert error["data"] == {"timeout": 0.2, "method": "stuck"}
    assert "0.2" in error["message"]
    assert stats(conn)["late_outcomes"] == 0
    release.set()
    assert finished.wait(WAIT)
    wait_until(lambda: stats(conn)["late_outcomes"] == 1, what="the late outcome to be counted")
    # no second reply for "s": the next line is the ping's
    assert conn.call("rpc.ping", id="p") == {"jsonrpc": "2.0", "id": "p", "result": "pong"}
    assert stats(conn)["errors_by_code"][str(ek.TIMEOUT)] == 1


def test_async_timeout(make_server, raw):
    server = make_server()
    cancelled = threading.Event()

    @server.command("forever", timeout=0.1)
    async def forever():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    conn = raw(server.address)
    error_of(conn.call("forever"), ek.TIMEOUT)
    assert cancelled.wait(WAIT)
    assert result_of(conn.call("rpc.ping")) == "pong"
    assert stats(conn)["requests_in_flight"] == 1  # only rpc.stats itself


def test_default_timeout_from_the_server(make_server, raw, release):
    server = make_server(timeout=0.1)

    @server.command("stuck")
    def stuck():
        release.wait(WAIT)

    conn = raw(server.address)
    assert error_of(conn.call("stuck"), ek.TIMEOUT)["data"]["timeout"] == 0.1


# -- built-ins ----------------------------------------------------------------------------


def test_ping_and_hello(raw):
    conn = raw()
    assert conn.call("rpc.ping", id=0) == {"jsonrpc": "2.0", "id": 0, "result": "pong"}
    info = result_of(conn.call("rpc.hello", {"client": "pytest", "protocol": "1.0"}))
    assert info == {
        "server": "statelink",
        "protocol": "1.0",
        "auth": None,
        "max_inflight": 256,
        "max_frame": 1 << 20,
        "max_depth": 32,
        "authenticated": True,
    }


def test_discover_lists_commands_and_params(server, raw):
    @server.command("move", timeout=7, description="Move the arm.")
    def move(x, y=0, *rest, speed=1.0, **extra):
        pass

    doc = result_of(raw().call("rpc.discover"))
    assert doc["openrpc"] == "1.3.2"
    methods = {m["name"]: m for m in doc["methods"]}
    assert {
        "add",
        "echo",
        "move",
        "rpc.ping",
        "rpc.hello",
        "rpc.discover",
        "rpc.stats",
        "rpc.subscribe",
        "rpc.unsubscribe",
        "rpc.cancel",
    } <= set(methods)
    # OpenRPC content descriptors: a function's params take any value (schema {})
    assert methods["add"]["params"] == [
        {"name": "a", "required": True, "schema": {}},
        {"name": "b", "required": True, "schema": {}},
    ]
    assert methods["add"]["description"] == "Add two numbers."
    assert methods["move"]["params"] == [
        {"name": "x", "required": True, "schema": {}},
        {"name": "y", "required": False, "schema": {}},
        {"name": "speed", "required": False, "schema": {}},
    ]
    assert methods["move"]["x-timeout"] == 7 and "timeout" not in methods["move"]
    assert methods["move"]["description"] == "Move the arm."
    assert all("result" in m and "errors" in m for m in methods.values())
    assert methods["echo"]["x-timeout"] == 30.0  # the server's default


def test_stats(raw):
    conn = raw()
    conn.call("add", [1, 2])
    conn.call("nope")
    s = stats(conn)
    assert s["connections"] == 1
    assert s["requests_total"] == 3
    assert s["replies_total"] == 2
    assert s["errors_by_code"] == {str(ek.METHOD_NOT_FOUND): 1}
    assert s["requests_in_flight"] == 1
    assert s["limits"]["max_frame"] == 1 << 20
    assert s["workers"] == 8


def test_cancel_a_sync_command(make_server, raw, release):
    server = make_server()
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)

    conn = raw(server.address)
    conn.request("slow", id=7)
    assert started.wait(WAIT)
    conn.request("rpc.cancel", {"id": 7}, id="c")
    replies = {r["id"]: r for r in (conn.json(), conn.json())}
    error = error_of(replies[7], ek.CANCELLED)
    assert error["data"] == {"id": 7}
    assert result_of(replies["c"]) == {"cancelled": True}
    # cancelling again, an unknown id, or bad params
    assert result_of(conn.call("rpc.cancel", {"id": 7}))["cancelled"] is False
    assert result_of(conn.call("rpc.cancel", {"id": "nope"}))["cancelled"] is False
    error_of(conn.call("rpc.cancel", [7]), ek.INVALID_PARAMS)
    error_of(conn.call("rpc.cancel", {"id": [7]}), ek.INVALID_PARAMS)


def test_cancel_an_async_command(make_server, raw):
    server = make_server()
    started = threading.Event()
    cancelled = threading.Event()

    @server.command("wait", timeout=60)
    async def wait():
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    conn = raw(server.address)
    conn.request("wait", id="w")
    assert started.wait(WAIT)
    conn.request("rpc.cancel", {"id": "w"}, id="c")
    replies = {r["id"]: r for r in (conn.json(), conn.json())}
    error_of(replies["w"], ek.CANCELLED)
    assert result_of(replies["c"]) == {"cancelled": True}
    assert cancelled.wait(WAIT)


def test_cancel_only_on_the_same_connection(make_server, raw, release):
    server = make_server()
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)
        return "finished"

    a, b = raw(server.address), raw(server.address)
    a.request("slow", id=1)
    assert started.wait(WAIT)
    assert result_of(b.call("rpc.cancel", {"id": 1}))["cancelled"] is False
    release.set()
    assert a.json() == {"jsonrpc": "2.0", "id": 1, "result": "finished"}


def test_subscribe_and_publish(server, raw):
    sub, other = raw(), raw()
    assert result_of(sub.call("rpc.subscribe", {"method": "device.state"})) == {
        "subscribed": "device.state"
    }
    params = {"device": "door", "state": "open", "previous": "closed", "command": "open"}
    server.call_soon(server.publish, "device.state", params)
    assert sub.json() == {"jsonrpc": "2.0", "method": "device.state", "params": params}
    # the publish has run: a connection that did not subscribe got nothing
    assert result_of(other.call("rpc.ping")) == "pong"
    assert result_of(sub.call("rpc.unsubscribe", ["device.state"])) == {
        "unsubscribed": "device.state"
    }
    server.call_soon(server.publish, "device.state", params)
    server.call_soon(server.publish, "other.event", {})
    assert result_of(sub.call("rpc.ping")) == "pong"  # published before this ping: nothing came
    error_of(sub.call("rpc.subscribe", {}), ek.INVALID_PARAMS)


def test_subscription_limit(make_server, raw):
    server = make_server(limits=Limits(max_subscriptions=2))
    conn = raw(server.address)
    result_of(conn.call("rpc.subscribe", {"method": "a"}))
    result_of(conn.call("rpc.subscribe", {"method": "b"}))
    result_of(conn.call("rpc.subscribe", {"method": "a"}))  # already subscribed: fine
    error_of(conn.call("rpc.subscribe", {"method": "c"}), ek.BUSY)


def test_progress_notifications(server, raw):
    from controller.server import Call, FunctionCommand

    class WithProgress(FunctionCommand):
        def start(self, call: Call) -> None:
            call.progress(0.5, "half way")
            call.resolve("done")

    server.register("job", WithProgress(server, "job", lambda: None, None, None))
    conn = raw()
    conn.call("rpc.subscribe", {"method": "rpc.progress"})  # progress is opt-in
    conn.request("job", id="k")
    # progress is sent with call_soon (it is thread-safe): it may follow the reply
    lines = [conn.json(), conn.json()]
    assert {"jsonrpc": "2.0", "id": "k", "result": "done"} in lines
    assert {
        "jsonrpc": "2.0",
        "method": "rpc.progress",
        "params": {"id": "k", "progress": 0.5, "message": "half way"},
    } in lines


# -- limits -------------------------------------------------------------------------------


def test_busy_when_the_worker_queue_is_full(make_server, raw, release):
    server = make_server(workers=1, limits=Limits(max_queue=1))
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow(n):
        started.set()
        release.wait(WAIT)
        return n

    conn = raw(server.address)
    conn.request("slow", [1], id=1)  # runs
    assert started.wait(WAIT)
    conn.request("slow", [2], id=2)  # queued
    reply = conn.call("slow", [3], id=3)  # answered at once: busy
    error = error_of(reply, ek.BUSY)
    assert error["data"] == {"retry": True}
    assert "worker queue full" in error["message"]
    # built-ins still answer
    assert result_of(conn.call("rpc.ping")) == "pong"
    release.set()
    assert sorted(r["result"] for r in (conn.json(), conn.json())) == [1, 2]


def test_max_inflight_refuses_the_extra_request(make_server, raw, release):
    server = make_server(workers=4, limits=Limits(max_inflight=3))

    @server.command("slow", timeout=60)
    def slow(n):
        release.wait(WAIT)
        return n

    conn = raw(server.address)
    other = raw(server.address)
    for i in range(3):
        conn.request("slow", [i], id=i)
    reply = conn.call("slow", [3], id=3)
    error = error_of(reply, ek.BUSY)
    assert error["data"] == {"max_inflight": 3, "retry": True}
    error_of(conn.call("rpc.ping"), ek.BUSY)  # everything counts, even a ping
    assert result_of(other.call("rpc.ping")) == "pong"  # per connection only
    release.set()
    assert sorted(conn.json()["result"] for _ in range(3)) == [0, 1, 2]
    assert result_of(conn.call("rpc.ping")) == "pong"


def test_max_connections(make_server, raw, wait_until):
    server = make_server(limits=Limits(max_connections=2))
    a, b = raw(server.address), raw(server.address)
    assert result_of(a.call("rpc.ping")) == "pong"
    assert result_of(b.call("rpc.ping")) == "pong"
    c = raw(server.address)
    reply = c.json()
    error = error_of(reply, ek.BUSY)
    assert reply["id"] is None
    assert error["data"] == {"max_connections": 2}
    assert c.closed()
    assert result_of(a.call("rpc.ping")) == "pong"  # the others are unaffected
    b.close()
    wait_until(lambda: stats(a)["connections"] == 1, what="the server to see the close")
    d = raw(server.address)
    assert result_of(d.call("rpc.ping")) == "pong"


def test_batch_limit_on_the_server(make_server, raw):
    server = make_server(limits=Limits(max_batch=2))
    conn = raw(server.address)
    conn.send_json([{"jsonrpc": "2.0", "id": i, "method": "rpc.ping"} for i in range(3)])
    error = error_of(conn.json(), ek.INVALID_REQUEST)
    assert error["data"] == {"max_batch": 2}
    conn.send_json([{"jsonrpc": "2.0", "id": i, "method": "rpc.ping"} for i in range(2)])
    assert sorted(r["id"] for r in conn.json()) == [0, 1]


def test_nesting_limit_on_the_server(raw):
    conn = raw()
    conn.send_line(
        b'{"jsonrpc":"2.0","id":1,"method":"echo","params":[' + b"[" * 100 + b"]" * 100 + b"]}"
    )
    error = error_of(conn.json(), ek.PARSE_ERROR)
    assert error["data"] == {"max_depth": 32}
    assert result_of(conn.call("rpc.ping")) == "pong"


# -- stop ---------------------------------------------------------------------------------


def test_graceful_stop_answers_in_flight_commands(make_server, raw, wait_until):
    server = make_server(grace=5)
    started = threading.Event()

    @server.command("finish_on_stop", timeout=60)
    def finish_on_stop():
        started.set()
        wait_until(lambda: server.stopping, what="stop() to begin")
        return "finished during the grace period"

    conn = raw(server.address)
    conn.request("finish_on_stop", id=1)
    assert started.wait(WAIT)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    assert conn.json() == {"jsonrpc": "2.0", "id": 1, "result": "finished during the grace period"}
    assert conn.closed()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1).close()


def test_stop_after_the_grace_period_cancels(make_server, raw, release):
    server = make_server()

    @server.command("stuck", timeout=60)
    def stuck():
        release.wait(WAIT)

    conn = raw(server.address)
    conn.request("stuck", id=1)
    assert result_of(conn.call("rpc.ping")) == "pong"  # "stuck" is dispatched
    server.stop(grace=0.1)
    error = error_of(conn.json(), ek.CANCELLED)
    assert error["data"] == {"reason": "shutdown"}
    assert conn.closed()


def test_requests_during_shutdown_get_busy(make_server, raw, wait_until):
    server = make_server(grace=5)
    started = threading.Event()
    go = threading.Event()

    @server.command("hold", timeout=60)
    def hold():
        started.set()
        go.wait(WAIT)
        return "held"

    conn = raw(server.address)
    conn.request("hold", id=1)
    assert started.wait(WAIT)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server.stopping, what="stop() to begin")
    error = error_of(conn.call("add", [1, 2], id=2), ek.BUSY)
    assert "shutting down" in error["message"]
    go.set()
    assert result_of(conn.json()) == "held"
    stopper.join(WAIT)


def test_stop_is_idempotent_and_start_twice_fails(make_server):
    server = make_server()
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    server.stop()


def test_port_in_use_is_an_oserror(server):
    # SO_REUSEADDR allows reuse after TIME_WAIT, not two listeners on one port
    other = CommandServer(host=server.address[0], port=server.address[1])
    with pytest.raises(OSError, match="cannot listen"):
        other.start()


def test_half_close_gets_the_replies_then_eof(make_server, raw):
    server = make_server()
    go = threading.Event()

    @server.command("later", timeout=60)
    def later():
        go.wait(WAIT)
        return "late reply"

    conn = raw(server.address)
    conn.request("later", id=1)
    conn.request("rpc.ping", id=2)
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.json() == {"jsonrpc": "2.0", "id": 2, "result": "pong"}
    go.set()
    assert conn.json() == {"jsonrpc": "2.0", "id": 1, "result": "late reply"}
    assert conn.closed()  # closed once the last reply is written, not at the idle timeout


def test_half_close_never_loses_a_queued_reply(server, raw):
    """A reply queued (not yet written) when the EOF arrives must still go out."""
    for i in range(60):
        conn = raw()
        conn.request("add", [i, 1], id=i)
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.json() == {"jsonrpc": "2.0", "id": i, "result": i + 1}
        assert conn.closed()
        conn.close()


def test_start_again_after_stop(make_server, raw, release):
    server = make_server(grace=0.1)

    @server.command("add")
    def add(a, b):
        return a + b

    @server.command("block", timeout=60)
    def block():
        release.wait(WAIT)

    first = raw(server.address)
    assert result_of(first.call("add", [1, 2])) == 3
    first.send_json({"jsonrpc": "2.0", "method": "block"})  # a notification still running ...
    assert result_of(first.call("rpc.ping")) == "pong"  # ... (dispatched) when stop() comes
    server.stop()
    assert first.closed()
    assert not server.running

    server.start()  # port 0: a new one
    assert server.running
    again = raw(server.address)
    assert result_of(again.call("add", [2, 3])) == 5
    s = stats(again)
    assert s["connections"] == 1  # nothing of the last run is counted in this one
    assert s["requests_in_flight"] == 1  # this call only, not the notification of the last run
    server.stop()
    assert again.closed()
    assert not server.running


def test_a_start_that_cannot_listen_leaves_no_worker_threads(server):
    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("statelink-worker")}

    before = workers()
    other = CommandServer(host=server.address[0], port=server.address[1])
    with pytest.raises(OSError, match="cannot listen"):
        other.start()
    for thread in workers() - before:
        thread.join(WAIT)
        assert not thread.is_alive(), thread


# -- request ids --------------------------------------------------------------------------


def test_a_duplicate_id_in_flight_is_invalid_and_the_first_is_unaffected(server, raw, release):
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)
        return "first"

    conn = raw()
    conn.request("slow", id=7)
    assert started.wait(WAIT)
    error = error_of(conn.call("echo", ["second"], id=7), ek.INVALID_REQUEST)
    assert error["data"] == {"reason": "the id is already in flight on this connection"}
    assert "already in flight" in error["message"]
    # rpc.cancel still reaches the first request, which is answered once, as cancelled
    conn.request("rpc.cancel", {"id": 7}, id="c")
    replies = {r["id"]: r for r in (conn.json(), conn.json())}
    assert result_of(replies["c"]) == {"cancelled": True}
    assert error_of(replies[7], ek.CANCELLED)["data"] == {"id": 7}
    assert result_of(conn.call("echo", ["again"], id=7)) == "again"  # free again once answered
    s = stats(conn)
    assert s["errors_by_code"] == {str(ek.INVALID_REQUEST): 1, str(ek.CANCELLED): 1}
    assert s["requests_in_flight"] == 1  # the cancelled "slow" is not counted any more


def test_a_duplicate_id_in_a_batch_is_invalid(server, raw, release):
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)
        return "first"

    conn = raw()
    conn.send_json(
        [
            {"jsonrpc": "2.0", "id": "b", "method": "slow"},
            {"jsonrpc": "2.0", "id": "b", "method": "echo", "params": ["second"]},
        ]
    )
    assert started.wait(WAIT)
    release.set()
    entries = conn.json()
    assert sorted(json.dumps(e, sort_keys=True) for e in entries) == sorted(
        json.dumps(e, sort_keys=True)
        for e in [
            {"jsonrpc": "2.0", "id": "b", "result": "first"},
            {
                "jsonrpc": "2.0",
                "id": "b",
                "error": {
                    "code": ek.INVALID_REQUEST,
                    "message": "Invalid Request: a request with this id is already in flight "
                    "on this connection",
                    "data": {"reason": "the id is already in flight on this connection"},
                },
            },
        ]
    )


def test_null_ids_in_flight_together_are_each_answered(server, raw, release):
    """A null id is allowed (if discouraged): several may be in flight on one connection."""
    started = threading.Semaphore(0)

    @server.command("slow", timeout=60)
    def slow(value):
        started.release()
        release.wait(WAIT)
        return value

    conn = raw()
    for value in ("a", "b"):
        conn.send_json({"jsonrpc": "2.0", "id": None, "method": "slow", "params": [value]})
    for _ in range(2):
        assert started.acquire(timeout=WAIT)
    assert stats(conn)["requests_in_flight"] == 3
    release.set()
    replies = [conn.json(), conn.json()]
    assert sorted(r["result"] for r in replies) == ["a", "b"]
    assert all(r["id"] is None for r in replies)
    assert stats(conn)["requests_in_flight"] == 1


def test_stop_answers_every_null_id_request_in_flight(make_server, raw, release):
    server = make_server()
    started = threading.Semaphore(0)

    @server.command("slow", timeout=60)
    def slow():
        started.release()
        release.wait(WAIT)

    conn = raw(server.address)
    for _ in range(2):
        conn.send_json({"jsonrpc": "2.0", "id": None, "method": "slow"})
    for _ in range(2):
        assert started.acquire(timeout=WAIT)
    server.stop(grace=0.1)
    replies = [conn.json(), conn.json()]
    assert conn.closed()
    assert conn.buffer == b""
    for reply in replies:
        assert reply["id"] is None
        assert error_of(reply, ek.CANCELLED)["data"] == {"reason": "shutdown"}


# -- callback delivery ----------------------------------------------------------------------


def _callback_sink() -> socket.socket:
    sink = socket.create_server(("127.0.0.1", 0))
    sink.settimeout(WAIT)
    return sink


def _read_line(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, f"the callback link closed; got {data!r}"
        data += chunk
    return json.loads(data)


def test_replies_go_to_the_request_connection_once_the_callback_link_is_closed(
    server, raw, release
):
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)
        return "slow done"

    conn = raw()
    with _callback_sink() as sink:
        port = sink.getsockname()[1]
        hello = result_of(conn.call("rpc.hello", {"callback_port": port}))
        assert hello["callback"] == {"host": "127.0.0.1", "port": port}
        conn.request("echo", ["over the link"], id=1)
        link, _ = sink.accept()
        with link:
            link.settimeout(WAIT)
            assert _read_line(link) == {"jsonrpc": "2.0", "id": 1, "result": "over the link"}
            conn.request("slow", id=2)
            assert started.wait(WAIT)
            # The client's end of the link goes away (here: shuts down; then closes). The
            # server sees the EOF and closes its end too: the link is given up.
            link.shutdown(socket.SHUT_WR)
            assert link.recv(65536) == b""
    release.set()
    # the reply to the request in flight, and every later one, come on the request connection
    assert conn.json() == {"jsonrpc": "2.0", "id": 2, "result": "slow done"}
    assert result_of(conn.call("echo", ["after"], id=3)) == "after"
    assert conn.call("nope", id=4)["error"]["code"] == ek.METHOD_NOT_FOUND


def test_a_client_whose_callback_listener_closes_still_gets_its_replies(server, wait_until):
    from controller import CallbackListener, Client

    listener = CallbackListener()
    try:
        with Client(server.address, reconnect=False, callback_listener=listener) as client:
            assert client.call("add", [40, 2], timeout=WAIT) == 42
            assert listener.received == 1  # delivered over the callback link
            (conn,) = server.connections
            link = conn.session.callback
            assert link is not None and link.usable
            listener.close()  # closes the link's socket too
            wait_until(lambda: not link.usable, WAIT, "the server to give up the link")
            assert client.call("add", [1, 2], timeout=WAIT) == 3  # on the request connection
            assert listener.received == 1
    finally:
        listener.close()


def test_replies_waiting_for_the_link_are_not_lost_when_rpc_hello_moves_it(server, raw):
    """rpc.hello with a new callback_port ends the old link while it is still connecting: the
    reply queued for it goes to the request connection instead."""
    conn = raw()
    with _callback_sink() as old, _callback_sink() as new:
        old_port, new_port = old.getsockname()[1], new.getsockname()[1]
        hello = {"jsonrpc": "2.0", "method": "rpc.hello"}
        conn.send(  # one read on the server: the old link cannot connect in between
            b"".join(
                json.dumps(message).encode() + b"\n"
                for message in (
                    dict(hello, id="h1", params={"callback_port": old_port}),
                    {"jsonrpc": "2.0", "id": "p", "method": "rpc.ping"},
                    dict(hello, id="h2", params={"callback_port": new_port}),
                )
            )
        )
        replies = [conn.json() for _ in range(3)]
        assert [r["id"] for r in replies] == ["h1", "p", "h2"]
        assert replies[1]["result"] == "pong"
        assert replies[2]["result"]["callback"] == {"host": "127.0.0.1", "port": new_port}
        conn.request("echo", ["new link"], id="e")
        link, _ = new.accept()
        with link:
            link.settimeout(WAIT)
            assert _read_line(link) == {"jsonrpc": "2.0", "id": "e", "result": "new link"}


def test_a_command_that_times_out_waiting_for_a_worker_never_runs(make_server, raw, release):
    """One worker, held by a slow command: a command queued behind it past its own timeout is
    answered with the timeout error, saying it never started, and never runs later."""
    server = make_server(workers=1)
    started = threading.Event()
    ran: list[str] = []

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)

    @server.command("quick", timeout=0.2)
    def quick():
        ran.append("quick")
        return "quick"

    conn = raw(server.address)
    conn.request("slow", id="slow")
    assert started.wait(WAIT)
    conn.request("quick", id="late")
    error = error_of(conn.json(), ek.TIMEOUT)
    assert error["data"]["started"] is False and "never ran" in error["message"]
    conn.request("quick", id="cancelled")
    conn.request("rpc.cancel", {"id": "cancelled"}, id="c")
    cancelled = error_of(conn.json(), ek.CANCELLED)
    assert cancelled["data"] == {"id": "cancelled"}
    assert result_of(conn.json()) == {"cancelled": True}
    release.set()
    assert conn.json()["id"] == "slow"
    assert result_of(conn.call("quick", id="now")) == "quick"
    assert ran == ["quick"]  # only the last one: the others never ran, not even later
    assert stats(conn)["late_outcomes"] == 0
