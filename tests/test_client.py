"""Client against live servers on 127.0.0.1: futures, callbacks, typed errors, reconnects,
callback delivery and authentication. Every wait is on an event or future, bounded."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest
from support import WAIT, RawConnection

from controller import (
    CallbackListener,
    CancelledError,
    Client,
    CommandTimeoutError,
    ConnectionLostError,
    DeviceFaultError,
    InvalidParamsError,
    Limits,
    MethodNotFoundError,
    ParseError,
    RpcError,
    UnauthorizedError,
    auth,
)
from controller.client import LateOutcome
from controller.client_reader import NO_ID, find_id
from controller.errors import ClientTimeoutError
from controller.protocol import DEFAULT_MAX_FRAME
from statemachines import errorkinds as ek


@pytest.fixture
def clients():
    """``clients(address, **kwargs)``: a connected Client, closed at teardown."""
    made: list[Client] = []

    def make(address, **kwargs) -> Client:
        client = Client(address, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def busy_server(make_server, release):
    """A server with ``slow`` (blocks on ``release``, then returns its argument) and friends."""
    server = make_server()
    server.started = threading.Event()

    @server.command("add")
    def add(a, b):
        return a + b

    @server.command("slow", timeout=60)
    def slow(value="slow"):
        server.started.set()
        release.wait(WAIT)
        return value

    @server.command("fail")
    def fail():
        raise RuntimeError("no power")

    return server


class Outcomes:
    """Counts callback invocations per future (callbacks run on client threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[int, int] = {}
        self.done = threading.Event()

    def callback(self, future: Future) -> None:
        with self.lock:
            self.calls[id(future)] = self.calls.get(id(future), 0) + 1
        self.done.set()

    def count(self, future: Future) -> int:
        with self.lock:
            return self.calls.get(id(future), 0)


# -- send_command -------------------------------------------------------------------------


def test_send_command_returns_at_once_and_calls_back_once(busy_server, clients, release):
    client = clients(busy_server.address)
    outcomes = Outcomes()
    t0 = time.monotonic()
    future = client.send_command("slow", ["result"], callback=outcomes.callback, timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert busy_server.started.wait(WAIT)
    assert not future.done() and outcomes.count(future) == 0
    assert client.pending == 1
    release.set()
    assert future.result(WAIT) == "result"
    assert outcomes.done.wait(WAIT)
    assert client.call("rpc.ping") == "pong"
    assert outcomes.count(future) == 1
    assert client.pending == 0


def test_server_error_is_a_typed_exception(busy_server, clients):
    client = clients(busy_server.address)
    outcomes = Outcomes()
    future = client.send_command("fail", callback=outcomes.callback)
    error = future.exception(WAIT)
    assert isinstance(error, DeviceFaultError) and isinstance(error, RpcError)
    assert error.code == ek.DEVICE_FAULT and error.kind == "device_fault"
    assert error.data == {"exception": "RuntimeError", "message": "no power"}
    assert outcomes.done.wait(WAIT) and outcomes.count(future) == 1


def test_client_timeout_then_late_reply_is_dropped(busy_server, clients, release):
    client = clients(busy_server.address)
    outcomes = Outcomes()
    t0 = time.monotonic()
    future = client.send_command("slow", callback=outcomes.callback, timeout=0.2)
    error = future.exception(WAIT)
    assert time.monotonic() - t0 >= 0.2
    assert isinstance(error, CommandTimeoutError) and isinstance(error, TimeoutError)
    assert isinstance(error, ClientTimeoutError)  # ours, not the server's
    assert error.code == ek.TIMEOUT
    assert error.data == {"timeout": 0.2, "method": "slow", "source": "client"}
    release.set()  # the server now answers; the client must drop that reply
    assert client.call("rpc.ping") == "pong"  # on the same connection: after the late reply
    assert outcomes.count(future) == 1
    assert client.pending == 0


def test_call_raises_typed_errors(busy_server, clients):
    client = clients(busy_server.address)
    assert client.call("add", [1, 2]) == 3
    assert client.call("add", {"a": "x", "b": "y"}) == "xy"
    with pytest.raises(MethodNotFoundError) as info:
        client.call("missing")
    assert info.value.code == ek.METHOD_NOT_FOUND and info.value.kind == "unknown_command"
    with pytest.raises(InvalidParamsError) as info:
        client.call("add", [1])
    assert "missing a required argument" in info.value.data["reason"]
    with pytest.raises(DeviceFaultError, match="no power"):
        client.call("fail")
    with pytest.raises(CommandTimeoutError):
        client.call("slow", timeout=0.1)


def test_params_that_are_not_json(busy_server, clients):
    client = clients(busy_server.address)
    future = client.send_command("add", [object(), 1])
    assert isinstance(future.exception(WAIT), TypeError)
    assert client.pending == 0


def test_many_threads_at_once(make_server, clients):
    # more calls in flight than the default limits (256 per connection, 1024 queued) allow
    server = make_server(limits=Limits(max_inflight=4096, max_queue=4096))

    @server.command("add")
    def add(a, b):
        return a + b

    client = clients(server.address)
    outcomes = Outcomes()
    n_threads, per_thread = 16, 100
    barrier = threading.Barrier(n_threads)
    futures: dict[tuple[int, int], Future] = {}
    lock = threading.Lock()

    def worker(t: int) -> None:
        barrier.wait(WAIT)
        for i in range(per_thread):
            future = client.send_command("add", [t * 1000, i], callback=outcomes.callback)
            with lock:
                futures[(t, i)] = future

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(futures) == n_threads * per_thread
    for (t, i), future in futures.items():
        assert future.result(WAIT) == t * 1000 + i
    assert client.call("rpc.ping") == "pong"
    assert all(outcomes.count(f) == 1 for f in futures.values())
    assert client.pending == 0


def test_notify(busy_server, clients):
    got: list = []
    seen = threading.Event()

    @busy_server.command("record")
    def record(*args):
        got.append(args)
        seen.set()

    client = clients(busy_server.address)
    assert client.notify("record", [1, "two"]) is True
    assert seen.wait(WAIT)
    assert got == [(1, "two")]
    assert client.pending == 0
    assert client.notify("no.such.method") is True  # no reply, ever
    assert client.call("rpc.ping") == "pong"


def test_subscribe_handler(busy_server, clients):
    client = clients(busy_server.address)
    got: list = []
    seen = threading.Event()

    def handler(params):
        got.append(params)
        seen.set()

    unsubscribe = client.subscribe("device.state", handler)
    params = {"device": "pump", "state": "on", "previous": "off", "command": "start"}
    busy_server.call_soon(busy_server.publish, "device.state", params)
    assert seen.wait(WAIT)
    assert got == [params]
    unsubscribe()
    assert client.call("rpc.ping") == "pong"  # the rpc.unsubscribe went first
    busy_server.call_soon(busy_server.publish, "device.state", params)
    assert client.call("rpc.ping") == "pong"  # published before this ping: nothing came
    assert got == [params]


def test_progress_notifications_reach_a_subscriber(busy_server, clients):
    from controller.server import FunctionCommand

    class WithProgress(FunctionCommand):
        def start(self, call):
            call.progress(0.25, "quarter")
            busy_server.call_soon(call.resolve, "done")

    busy_server.register("job", WithProgress(busy_server, "job", lambda: None, None, None))
    client = clients(busy_server.address)
    got: list = []
    client.subscribe("rpc.progress", got.append)
    future = client.send_command("job")
    assert future.result(WAIT) == "done"
    assert got == [{"id": got[0]["id"], "progress": 0.25, "message": "quarter"}]


def test_future_cancel_drops_the_reply_and_the_connection_goes_on(
    busy_server, clients, release, wait_until
):
    """``future.cancel()`` by the user: the late reply must not kill the reader thread (a
    ``set_result`` on a cancelled future raises ``InvalidStateError``)."""
    client = clients(busy_server.address)
    outcomes = Outcomes()
    future = client.send_command("slow", ["late"], callback=outcomes.callback, timeout=30)
    assert busy_server.started.wait(WAIT)
    assert future.cancel() is True
    assert future.cancelled() and outcomes.count(future) == 1
    replies = busy_server.stats.replies_total
    release.set()
    # Once the server has counted the reply to "slow", it is queued on this connection ahead
    # of any reply to a later request: the reader handles it before the "add" reply below.
    wait_until(lambda: busy_server.stats.replies_total > replies, what="the reply to slow")
    assert client.call("add", [1, 2]) == 3
    assert client.call("add", [3, 4]) == 7
    assert outcomes.count(future) == 1
    assert client.pending == 0  # the cancelled request is no longer waited for


# -- losing the connection ----------------------------------------------------------------


def fake_server(script):
    """A listening socket whose one connection runs ``script(conn, lines)`` on a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)

    def serve():
        conn, _ = listener.accept()
        with conn:
            script(conn, conn.makefile("rb"))
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[:2], thread


def test_connection_dropped_mid_request_gives_connection_lost(clients):
    got_request = threading.Event()

    def script(conn, lines):
        hello = json.loads(lines.readline())
        conn.sendall(
            json.dumps(
                {"jsonrpc": "2.0", "id": hello["id"], "result": {"server": "fake", "auth": None}}
            ).encode()
            + b"\n"
        )
        lines.readline()  # the request: never answered
        got_request.set()

    address, thread = fake_server(script)
    client = clients(address, reconnect=False)
    outcomes = Outcomes()
    future = client.send_command("anything", callback=outcomes.callback, timeout=30)
    error = future.exception(WAIT)
    assert got_request.is_set()
    assert isinstance(error, ConnectionLostError) and isinstance(error, ConnectionError)
    assert error.code == ek.CONNECTION_LOST and error.kind == "connection_lost"
    assert error.data == {"method": "anything"}
    assert outcomes.count(future) == 1
    thread.join(WAIT)
    # not connected any more: at once, not after the timeout
    later = client.send_command("rpc.ping", timeout=30)
    assert isinstance(later.exception(1.0), ConnectionLostError)


def test_server_stopped_mid_request_then_reconnect(make_server, clients, release):
    server = make_server(grace=0.1)
    started = threading.Event()

    @server.command("slow", timeout=60)
    def slow():
        started.set()
        release.wait(WAIT)

    port = server.address[1]
    client = clients(server.address, max_backoff=0.2)
    up, down = threading.Event(), threading.Event()
    client.on_connection(lambda connected: (up if connected else down).set())
    got: list = []
    client.subscribe("device.state", got.append)

    future = client.send_command("slow", timeout=30)
    assert started.wait(WAIT)
    server.stop()
    # stop() answers what is still running after the grace period: cancelled (shutdown)
    error = future.exception(WAIT)
    assert isinstance(error, CancelledError)
    assert error.data == {"reason": "shutdown"}
    assert down.wait(WAIT)
    assert not client.connected
    lost = client.send_command("rpc.ping", timeout=30)
    assert isinstance(lost.exception(1.0), ConnectionLostError)
    assert "reconnecting" in lost.exception().message

    # a new server on the same port: the client reconnects by itself
    again = make_server(port=port)

    @again.command("add")
    def add(a, b):
        return a + b

    assert up.wait(WAIT)
    assert client.connected and client.reconnects == 1
    assert client.call("add", [2, 3]) == 5
    # the subscription was renewed on the new connection (before that call)
    params = {"device": "d", "state": "s", "previous": "p", "command": "c"}
    again.call_soon(again.publish, "device.state", params)
    assert client.call("rpc.ping") == "pong"
    assert got == [params]


SERVER_SCRIPT = r"""
import sys, threading
from controller import CommandServer

server = CommandServer(port=0)

@server.command("slow", timeout=60)
def slow():
    print("started", flush=True)
    threading.Event().wait()

server.start()
print(server.address[1], flush=True)
threading.Event().wait()
"""


def read_line(stream, timeout: float = WAIT) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line from the server process; got {data!r}"
        ready, _, _ = select.select([stream], [], [], remaining)
        if ready:
            chunk = os.read(stream.fileno(), 1)
            assert chunk, f"the server process ended; got {data!r}"
            data += chunk
    return data.decode().strip()


def test_server_process_killed_mid_request(clients):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT],
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        port = int(read_line(proc.stdout))
        client = clients(("127.0.0.1", port), reconnect=False)
        assert client.call("rpc.ping") == "pong"
        outcomes = Outcomes()
        future = client.send_command("slow", callback=outcomes.callback, timeout=30)
        assert read_line(proc.stdout) == "started"
        os.kill(proc.pid, signal.SIGKILL)
        error = future.exception(WAIT)
        assert isinstance(error, ConnectionLostError)
        assert outcomes.count(future) == 1
    finally:
        proc.kill()
        proc.wait(WAIT)
        proc.stdout.close()


def test_connect_refused_is_an_oserror():
    sock = socket.create_server(("127.0.0.1", 0))
    address = sock.getsockname()[:2]
    sock.close()
    with pytest.raises(OSError):
        Client(address, reconnect=False)


# -- callback delivery --------------------------------------------------------------------


def test_callback_listener_end_to_end(busy_server, clients):
    with CallbackListener() as listener:
        client = clients(busy_server.address, callback_listener=listener)
        assert client.server_info["callback"] == {"host": "127.0.0.1", "port": listener.address[1]}
        assert listener.received == 0  # the handshake is answered on the request connection
        assert client.call("add", [40, 2]) == 42
        assert listener.received == 1
        futures = [client.send_command("add", [i, i]) for i in range(20)]
        assert [f.result(WAIT) for f in futures] == [2 * i for i in range(20)]
        assert listener.received == 21
        with pytest.raises(DeviceFaultError):
            client.call("fail")
        assert listener.received == 22
        client.close()


def test_two_clients_share_a_callback_listener(busy_server, clients):
    """Each client numbers its requests from 1: the listener must route replies by the
    client's own random id prefix, never by the number alone."""
    with CallbackListener() as listener:
        a = clients(busy_server.address, callback_listener=listener, name="a")
        b = clients(busy_server.address, callback_listener=listener, name="b")
        assert a.id_prefix and b.id_prefix and a.id_prefix != b.id_prefix
        expected: list[tuple[Future, int]] = []
        for i in range(50):  # interleaved: a's n-th and b's n-th requests are in flight at once
            expected.append((a.send_command("add", [1000, i]), 1000 + i))
            expected.append((b.send_command("add", [2000, i]), 2000 + i))
        for future, value in expected:
            assert future.result(WAIT) == value
        ids = [future.request_id for future, _ in expected]
        assert len(set(ids)) == len(ids)
        assert all(isinstance(i, str) for i in ids)
        assert ids[0].startswith(a.id_prefix + ".") and ids[1].startswith(b.id_prefix + ".")
        assert (listener.received, listener.delivered, listener.dropped) == (100, 100, 0)
        assert a.pending == 0 and b.pending == 0
        a.close()
        b.close()


def test_a_peer_cannot_inject_replies_through_the_callback_listener(
    busy_server, clients, release, wait_until
):
    with CallbackListener() as listener:
        client = clients(busy_server.address, callback_listener=listener)
        future = client.send_command("slow", ["real"], timeout=30)
        assert busy_server.started.wait(WAIT)
        number = future.request_id.rpartition(".")[2]
        forged = [
            {"jsonrpc": "2.0", "id": int(number), "result": "forged"},  # a client's plain number
            {"jsonrpc": "2.0", "id": number, "result": "forged"},
            {"jsonrpc": "2.0", "id": f"{'0' * 32}.{number}", "result": "forged"},  # wrong prefix
            {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": ek.INVALID_REQUEST, "message": "forged"},
            },
            {"jsonrpc": "2.0", "method": "device.state", "params": {"forged": True}},
        ]
        with RawConnection(listener.address) as intruder:
            for message in forged:
                intruder.send_json(message)
            wait_until(lambda: listener.dropped == len(forged), what="the forged messages")
        assert not future.done()
        release.set()
        assert future.result(WAIT) == "real"
        assert listener.delivered == 1 and listener.dropped == len(forged)
        client.close()


def test_future_cancel_with_callback_delivery(busy_server, clients, release, wait_until):
    with CallbackListener() as listener:
        client = clients(busy_server.address, callback_listener=listener)
        future = client.send_command("slow", timeout=30)
        assert busy_server.started.wait(WAIT)
        assert future.cancel() is True
        release.set()
        wait_until(lambda: listener.dropped == 1, what="the dropped reply to slow")
        assert client.call("add", [2, 2]) == 4
        assert listener.delivered == 1
        client.close()


def test_callback_port_must_be_a_port(busy_server, raw):
    conn = raw(busy_server.address)
    reply = conn.call("rpc.hello", {"callback_port": 70000})
    assert reply["error"]["code"] == ek.INVALID_PARAMS


# -- authentication -----------------------------------------------------------------------


@pytest.fixture
def secret_server(make_server):
    server = make_server(secret="s3cret")

    @server.command("add")
    def add(a, b):
        return a + b

    return server


def test_right_secret_works(secret_server, clients):
    client = clients(secret_server.address, secret="s3cret")
    assert client.server_info["authenticated"] is True
    assert client.server_info["auth"] == "hmac-sha256"
    assert client.call("add", [1, 2]) == 3


def test_wrong_secret_is_unauthorized(secret_server):
    with pytest.raises(UnauthorizedError) as info:
        Client(secret_server.address, secret="wrong", reconnect=False)
    assert info.value.code == ek.UNAUTHORIZED


def test_no_secret_is_unauthorized(secret_server):
    with pytest.raises(UnauthorizedError, match="requires the shared secret"):
        Client(secret_server.address, reconnect=False)


def test_raw_call_before_hello_is_refused_then_closed(secret_server, raw):
    conn = raw(secret_server.address)
    for i in range(3):
        reply = conn.call("rpc.ping", id=i)
        assert reply["error"]["code"] == ek.UNAUTHORIZED
        assert reply["error"]["data"] == {"auth": "hmac-sha256"}
    assert conn.closed()


def test_raw_wrong_response_is_refused(secret_server, raw):
    conn = raw(secret_server.address)
    hello = conn.call("rpc.hello", {"nonce": "abc"})["result"]
    assert hello["authenticated"] is False and hello["challenge"]
    reply = conn.call("rpc.hello", {"response": "0" * 64})
    assert reply["error"]["code"] == ek.UNAUTHORIZED


def test_raw_handshake(secret_server, raw):
    conn = raw(secret_server.address)
    secret, nonce = b"s3cret", "client-nonce-1"
    hello = conn.call("rpc.hello", {"client": "raw", "nonce": nonce})["result"]
    challenge = hello["challenge"]
    assert hello["proof"] == auth.digest(secret, "server", challenge, nonce)
    reply = conn.call("rpc.hello", {"response": auth.digest(secret, "client", challenge, nonce)})
    assert reply["result"]["authenticated"] is True
    assert conn.call("add", [2, 2])["result"] == 4


def test_callback_listener_with_authentication(secret_server, clients):
    with CallbackListener() as listener:
        client = clients(secret_server.address, secret="s3cret", callback_listener=listener)
        assert client.server_info["authenticated"] is True
        assert client.server_info["callback"]["port"] == listener.address[1]
        assert listener.received == 0
        assert client.call("add", [1, 2]) == 3
        assert listener.received == 1
        client.close()


def test_callback_delivery_on_the_wire(busy_server, raw):
    """Replies go to the peer's own address at callback_port, batch replies too;
    rpc.hello is answered on the request connection."""
    back = socket.create_server(("127.0.0.1", 0))
    back.settimeout(WAIT)
    try:
        conn = raw(busy_server.address)
        hello = conn.call("rpc.hello", {"callback_port": back.getsockname()[1]})["result"]
        assert hello["callback"] == {"host": "127.0.0.1", "port": back.getsockname()[1]}
        conn.request("add", [1, 2], id="via-callback")
        link, _ = back.accept()  # the server connected back
        with link:
            link.settimeout(WAIT)
            lines = link.makefile("rb")
            assert json.loads(lines.readline()) == {
                "jsonrpc": "2.0",
                "id": "via-callback",
                "result": 3,
            }
            conn.send_json([{"jsonrpc": "2.0", "id": "b1", "method": "rpc.ping"}])
            assert json.loads(lines.readline()) == [
                {"jsonrpc": "2.0", "id": "b1", "result": "pong"}
            ]
            result = conn.call("rpc.hello", {"client": "again"}, id="h2")  # on this connection
            assert result["result"]["callback"]["port"] == back.getsockname()[1]
    finally:
        back.close()


def test_callback_port_refused_falls_back_to_the_request_connection(busy_server, raw):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connect is refused
    conn = raw(busy_server.address)
    hello = conn.call("rpc.hello", {"callback_port": port})["result"]
    assert hello["callback"] is None
    assert hello["callback_error"].startswith(f"cannot connect to 127.0.0.1:{port}: ")
    assert conn.call("add", [2, 2], id="x")["result"] == 4
    assert conn.call("add", [3, 3], id="y")["result"] == 6


def test_a_client_that_fails_to_connect_leaves_its_callback_listener() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = CallbackListener()
    try:
        for _ in range(20):
            with pytest.raises(OSError):
                Client(("127.0.0.1", port), callback_listener=listener, reconnect=False)
        assert listener._clients == {}
    finally:
        listener.close()


# -- keys, replayed, late outcomes, replies it cannot decode ---------------------------------


def _hello_then(script):
    """A fake server script: answer ``rpc.hello``, then run ``script(conn, lines, send)``."""

    def run(conn, lines):
        def send(obj_or_bytes) -> None:
            if isinstance(obj_or_bytes, bytes):
                conn.sendall(obj_or_bytes)
            else:
                conn.sendall(json.dumps(obj_or_bytes).encode() + b"\n")

        hello = json.loads(lines.readline())
        send({"jsonrpc": "2.0", "id": hello["id"], "result": {"server": "fake", "auth": None}})
        script(conn, lines, send)

    return run


def test_key_is_sent_and_replayed_is_on_the_future(clients):
    requests: list[dict] = []

    def script(conn, lines, send):
        for replayed in (False, True, False):
            request = json.loads(lines.readline())
            requests.append(request)
            reply = {"jsonrpc": "2.0", "id": request["id"], "result": "done"}
            if replayed:
                reply["replayed"] = True
            send(reply)
        lines.readline()  # until the client closes

    address, thread = fake_server(_hello_then(script))
    client = clients(address, reconnect=False)
    first = client.send_command("dev.work", {"n": 1}, timeout=WAIT, key="run-1:1")
    assert first.result(WAIT) == "done" and first.replayed is False and first.key == "run-1:1"
    second = client.send_command("dev.work", {"n": 1}, timeout=WAIT, key="run-1:1")
    assert second.result(WAIT) == "done" and second.replayed is True
    assert client.call("dev.other", timeout=WAIT) == "done"
    assert [r.get("key", "no key") for r in requests] == ["run-1:1", "run-1:1", "no key"]
    client.close()
    thread.join(WAIT)


def test_a_request_without_key_has_no_key(busy_server, clients):
    client = clients(busy_server.address)
    future = client.send_command("add", [1, 2])
    assert future.result(WAIT) == 3 and future.key is None and future.replayed is False


def test_a_too_deep_reply_fails_its_request_at_once_and_the_connection_goes_on(clients):
    depth = 40  # deeper than the protocol's DEFAULT_MAX_DEPTH (32)

    def script(conn, lines, send):
        deep = json.loads(lines.readline())
        send(b'{"jsonrpc":"2.0","id":%s,"result":%s%s}\n' % (
            json.dumps(deep["id"]).encode(), b"[" * depth, b"]" * depth))  # fmt: skip
        ping = json.loads(lines.readline())
        send({"jsonrpc": "2.0", "id": ping["id"], "result": "pong"})
        lines.readline()

    address, thread = fake_server(_hello_then(script))
    client = clients(address, reconnect=False)
    t0 = time.monotonic()
    future = client.send_command("dev.deep", timeout=120)  # far longer than any wait here
    error = future.exception(WAIT)
    assert isinstance(error, ParseError) and error.kind == "parse_error", error
    assert time.monotonic() - t0 < WAIT  # at once, not after its 120 s timeout
    assert "dev.deep" in error.message and "nesting deeper than 32" in error.message
    assert error.data["max_depth"] == 32 and error.data["source"] == "client"
    assert client.call("rpc.ping", timeout=WAIT) == "pong"  # same connection, still fine
    client.close()
    thread.join(WAIT)


def test_an_over_long_reply_fails_its_request_at_once_and_the_connection_goes_on(clients):
    size = DEFAULT_MAX_FRAME + 1000

    def script(conn, lines, send):
        big = json.loads(lines.readline())
        head = b'{"jsonrpc":"2.0","id":%s,"result":"' % json.dumps(big["id"]).encode()
        send(head + b"x" * (size - len(head) - 2) + b'"}\n')
        ping = json.loads(lines.readline())
        send({"jsonrpc": "2.0", "id": ping["id"], "result": "pong"})
        lines.readline()

    address, thread = fake_server(_hello_then(script))
    client = clients(address, reconnect=False)
    t0 = time.monotonic()
    future = client.send_command("dev.big", timeout=120)
    error = future.exception(WAIT)
    assert isinstance(error, ParseError), error
    assert time.monotonic() - t0 < WAIT
    assert f"{size} bytes, over the frame limit of {DEFAULT_MAX_FRAME} bytes" in error.message
    assert error.data["size"] == size and error.data["max_frame"] == DEFAULT_MAX_FRAME
    assert client.call("rpc.ping", timeout=WAIT) == "pong"
    client.close()
    thread.join(WAIT)


def test_the_limits_announced_by_rpc_hello_are_used(clients):
    def script(conn, lines):
        def send(obj) -> None:
            conn.sendall(json.dumps(obj).encode() + b"\n")

        hello = json.loads(lines.readline())
        info = {"server": "fake", "auth": None, "max_frame": 100, "max_depth": 3}
        send({"jsonrpc": "2.0", "id": hello["id"], "result": info})
        request = json.loads(lines.readline())
        send({"jsonrpc": "2.0", "id": request["id"], "result": [[[["four"]]]]})
        lines.readline()

    address, thread = fake_server(script)
    client = clients(address, reconnect=False)
    error = client.send_command("dev.deep", timeout=120).exception(WAIT)
    assert isinstance(error, ParseError) and error.data["max_depth"] == 3
    client.close()
    thread.join(WAIT)


def test_find_id_reads_the_id_of_lines_it_cannot_decode() -> None:
    assert find_id('{"jsonrpc":"2.0","id":7,"result":' + "[" * 5000) == 7
    assert find_id('{"result": {"a": [1, "}"]}, "id": "x.1"}') == "x.1"
    assert find_id('{"jsonrpc":"2.0","id":"cut sh') is NO_ID
    assert find_id("[1, 2]") is NO_ID and find_id('{"id": true}') is NO_ID
    assert find_id('{"jsonrpc": "2.0", "id": null, "error": {}}') is None


def test_a_reply_after_the_client_timeout_goes_to_on_late(clients):
    answer, answer_again = threading.Event(), threading.Event()

    def script(conn, lines, send):
        request = json.loads(lines.readline())
        answer.wait(WAIT)
        send({"jsonrpc": "2.0", "id": request["id"], "result": "finally", "replayed": True})
        failing = json.loads(lines.readline())
        answer_again.wait(WAIT)
        send({"jsonrpc": "2.0", "id": failing["id"], "error": {"code": ek.CANCELLED,
              "message": "cancelled"}})  # fmt: skip
        lines.readline()

    address, thread = fake_server(_hello_then(script))
    client = clients(address, reconnect=False)
    late: queue.Queue[LateOutcome] = queue.Queue()
    future = client.send_command("dev.slow", timeout=0.2, key="k:1", on_late=late.put)
    assert isinstance(future.exception(WAIT), ClientTimeoutError)
    answer.set()
    outcome = late.get(timeout=WAIT)
    assert (outcome.method, outcome.key, outcome.result, outcome.error) == (
        "dev.slow", "k:1", "finally", None)  # fmt: skip
    assert outcome.replayed and not outcome.lost and outcome.request_id == future.request_id
    second = client.send_command("dev.fails", timeout=0.2, on_late=late.put)
    assert isinstance(second.exception(WAIT), ClientTimeoutError)
    answer_again.set()
    failed = late.get(timeout=WAIT)
    assert isinstance(failed.error, CancelledError) and failed.result is None
    client.close()
    thread.join(WAIT)
    assert late.empty()  # each late outcome once


def test_timed_out_requests_are_remembered_up_to_a_bound(clients, monkeypatch):
    import controller.client_base as client_base

    monkeypatch.setattr(client_base, "MAX_LATE", 2)

    def script(conn, lines, send):
        for _ in range(3):
            lines.readline()  # never answered
        lines.readline()

    address, thread = fake_server(_hello_then(script))
    client = clients(address, reconnect=False)
    late: queue.Queue[LateOutcome] = queue.Queue()
    futures = [client.send_command("dev.hang", timeout=0.1, on_late=late.put) for _ in range(3)]
    for future in futures:
        assert isinstance(future.exception(WAIT), ClientTimeoutError)
    given_up = late.get(timeout=WAIT)  # the oldest, once the third timed out
    assert given_up.lost and given_up.request_id == futures[0].request_id
    client.close()  # the connection goes: the other two will never be answered either
    rest = {late.get(timeout=WAIT).request_id for _ in range(2)}
    assert rest == {futures[1].request_id, futures[2].request_id}
    thread.join(WAIT)
