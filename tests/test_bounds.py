"""Every bound of ``Limits`` (docs/reliability.md): each test hits the bound, checks the
documented error, and checks that the server goes on serving other clients.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
from concurrent.futures import Future

import pytest
from reliability_helpers import (
    REPO,
    ChildServer,
    error_code,
    listener,
    ping_ok,
    serve,
    stats,
)
from support import WAIT, wait_until
from support import RawConnection as Raw

from controller import BusyError, Client, Limits, cli
from controller.devices import add_device
from statemachines import errorkinds as ek
from statemachines.errorkinds import BUSY, INVALID_REQUEST, PARSE_ERROR


def request_line(method: str, params: object = None, id: object = 1) -> bytes:
    message: dict[str, object] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def test_max_connections():
    with serve(limits=Limits(max_connections=3)) as server:
        conns = [Raw(server.address) for _ in range(3)]
        try:
            for conn in conns:
                assert conn.call("rpc.ping")["result"] == "pong"
            with Raw(server.address) as extra:
                reply = extra.json()
                assert error_code(reply) == BUSY and reply["id"] is None
                assert "too many connections (limit 3)" in reply["error"]["message"]
                assert reply["error"]["data"] == {"max_connections": 3}
                assert extra.closed(WAIT)
            with pytest.raises(BusyError):
                Client(server.address, reconnect=False)
            assert conns[0].call("echo", [1])["result"] == 1  # the others go on
            conns.pop().close()

            def admitted() -> bool:
                try:
                    return ping_ok(server.address)
                except BusyError:
                    return False

            wait_until(admitted, what="a free slot after one client left")
        finally:
            for conn in conns:
                conn.close()
        wait_until(lambda: stats(server.address)["connections"] == 1)
        assert stats(server.address)["closed_by_reason"]["max_connections"] == 2


def test_max_inflight_per_connection():
    with serve(limits=Limits(max_inflight=3), workers=4) as server, Raw(server.address) as raw:
        for i in range(3):
            raw.request("hang", [30], id=i)
        reply = raw.call("echo", ["one too many"], id="extra")
        assert error_code(reply) == BUSY
        assert reply["error"]["data"] == {"max_inflight": 3, "retry": True}
        assert (
            "too many requests in flight on this connection (limit 3)" in reply["error"]["message"]
        )
        with Client(server.address, reconnect=False) as other:  # per connection, not global
            assert other.call("echo", ["served"]) == "served"
            assert other.call("rpc.stats")["requests_in_flight"] == 4  # 3 hang + this call
        server.test_release.set()
        assert sorted(raw.json()["id"] for _ in range(3)) == [0, 1, 2]
        assert raw.call("echo", ["again"])["result"] == "again"


def test_worker_queue_full_is_busy_at_once():
    with (
        serve(workers=1, limits=Limits(max_queue=2)) as server,
        Client(server.address, reconnect=False) as client,
    ):
        hung = [client.send_command("hang", [30], timeout=WAIT) for _ in range(3)]  # 1 + 2
        busy = client.send_command("echo", ["no room"], timeout=WAIT)
        with pytest.raises(BusyError, match=r"worker queue full \(1 workers, 2 queued\)") as info:
            busy.result(timeout=2.0)  # at once, although the only worker is blocked
        assert info.value.data == {"retry": True}
        assert client.call("rpc.ping") == "pong"  # built-ins run on the I/O thread
        assert ping_ok(server.address)
        server.test_release.set()
        assert [f.result(timeout=WAIT) for f in hung] == ["released"] * 3
        assert client.call("echo", ["room again"]) == "room again"
        assert stats(server.address)["errors_by_code"] == {str(BUSY): 1}


def test_device_lane_is_bounded_by_max_queue(tmp_path):
    from reliability_helpers import write_device

    from statemachines.device import load_device

    config = write_device(tmp_path)
    # cancelled halfway (by the disconnect below), `slow` ends in idle, not in its default fault
    text = config.read_text()
    if "cancelled: idle" not in text:
        text = text.replace("    timeout: 30s\n", "    timeout: 30s\n    cancelled: idle\n")
        config.write_text(text)
    assert "cancelled: idle" in text
    with serve(limits=Limits(max_queue=2)) as server:
        add_device(server, load_device(config))
        with Raw(server.address) as raw:
            raw.request("testdev.slow", {"seconds": 20}, id="running")
            wait_until(lambda: stats(server.address)["requests_in_flight"] == 2)
            raw.request("testdev.ok", id="waiting-1")
            raw.request("testdev.ok", id="waiting-2")
            reply = raw.call("testdev.ok", id="one-too-many")
            assert error_code(reply) == BUSY
            assert "device testdev has 2 commands waiting" in reply["error"]["message"]
            assert reply["error"]["data"] == {"device": "testdev", "retry": True}
            assert ping_ok(server.address)
            raw.abort()  # the running command is cancelled, the waiting ones dropped
        wait_until(
            lambda: stats(server.address)["requests_in_flight"] == 1,
            what="the device lane to empty",
        )
        with Client(server.address, reconnect=False) as client:
            assert client.call("testdev.ok") == {"ok": True}
            assert client.call("testdev.state")["state"] == "idle"


def test_frame_size():
    limit = 1024
    with serve(limits=Limits(max_frame=limit)) as server:
        with Raw(server.address) as raw:
            pad = limit - (len(request_line("echo", [""])) - 1)
            line = request_line("echo", ["x" * pad])
            assert len(line) - 1 == limit  # exactly at the bound: accepted
            raw.send(line)
            assert raw.json()["result"] == "x" * pad
            raw.send(request_line("echo", ["x" * 2 * limit]))
            reply = raw.json()
            assert error_code(reply) == INVALID_REQUEST
            assert reply["error"]["data"] == {"max_frame": limit}
            assert f"frame limit of {limit} bytes" in reply["error"]["message"]
            assert raw.closed(WAIT)
        with Raw(server.address) as unterminated:  # no newline at all: same bound
            unterminated.send(b"[" * (limit + 10))
            assert error_code(unterminated.json()) == INVALID_REQUEST
            assert unterminated.closed(WAIT)
        assert ping_ok(server.address)
        assert stats(server.address)["closed_by_reason"]["frame_limit"] == 2


def test_batch_size():
    with serve(limits=Limits(max_batch=5)) as server, Raw(server.address) as raw:
        batch = [{"jsonrpc": "2.0", "id": i, "method": "echo", "params": [i]} for i in range(6)]
        raw.send_json(batch)
        reply = raw.json()
        assert error_code(reply) == INVALID_REQUEST
        assert reply["error"]["data"] == {"max_batch": 5}
        assert "batch of 6 calls exceeds the limit of 5" in reply["error"]["message"]
        raw.send_json(batch[:5])
        assert sorted(r["result"] for r in raw.json()) == [0, 1, 2, 3, 4]
        assert ping_ok(server.address)


def nested(depth: int) -> object:
    value: object = "core"
    for _ in range(depth):
        value = [value]
    return value


def test_json_nesting_depth():
    with serve(limits=Limits(max_depth=8)) as server, Raw(server.address) as raw:
        assert raw.call("echo", [nested(6)])["result"] == nested(6)  # 1 + 1 + 6 = 8 levels
        raw.request("echo", [nested(7)], id="deep")
        reply = raw.json()
        assert error_code(reply) == PARSE_ERROR
        assert reply["error"]["data"] == {"max_depth": 8}
        assert "nesting deeper than 8 levels" in reply["error"]["message"]
        raw.send_line(b"[" * 200_000)  # refused cheaply, never recursed into
        assert error_code(raw.json()) == PARSE_ERROR
        assert raw.call("echo", ["still here"])["result"] == "still here"
        assert ping_ok(server.address)


def test_idle_timeout():
    with (
        serve(limits=Limits(idle_timeout=0.3)) as server,
        Raw(server.address) as silent,
        Raw(server.address) as working,
    ):
        working.request("hang", [30], id="work")
        assert silent.closed(WAIT), "an idle connection is closed"
        # a connection waiting for a reply is not idle
        server.test_release.set()
        assert working.json()["result"] == "released"
        assert working.closed(WAIT), "idle once answered"
        snapshot = stats(server.address)
        assert snapshot["closed_by_reason"]["idle_timeout"] == 2
        assert snapshot["limits"]["idle_timeout"] == 0.3


def test_frame_timeout_closes_a_byte_at_a_time_client():
    with (
        serve(limits=Limits(frame_timeout=0.3, idle_timeout=60)) as server,
        Raw(server.address) as trickler,
        Raw(server.address) as normal,
    ):
        line = b'{"jsonrpc":"2.0","id":1,"method":"rpc.ping"}'
        trickler.send(line[:5])  # a line begun and never finished
        # each further byte is "activity", but the line is never completed in time
        for byte in line[5:12]:
            trickler.send(bytes([byte]))
            assert normal.call("rpc.ping")["result"] == "pong"
        assert trickler.closed(WAIT), "a line not finished within frame_timeout closes"
        assert normal.call("rpc.ping")["result"] == "pong"
        snapshot = stats(server.address)
        assert snapshot["closed_by_reason"]["frame_timeout"] == 1
        assert normal.call("rpc.ping")["result"] == "pong"  # whole lines are never affected


def test_handshake_timeout():
    secret = "s3cret-for-the-handshake-test"
    limits = Limits(handshake_timeout=0.3)
    with (
        serve(secret=secret, limits=limits) as server,
        Client(server.address, secret=secret, reconnect=False) as client,
        Raw(server.address) as silent,
        Raw(server.address) as halfway,
    ):
        halfway.call("rpc.hello", {"nonce": "n"})  # asked for a challenge, never answers
        assert silent.closed(WAIT)
        assert halfway.closed(WAIT)
        assert client.call("echo", ["authenticated clients stay"]) == "authenticated clients stay"
        assert client.call("rpc.stats")["closed_by_reason"]["handshake_timeout"] == 2


def test_outgoing_buffer_of_a_client_that_stops_reading(tmp_path):
    """A client keeps sending requests with big results and never reads: the server closes it,
    counts it, keeps its memory bounded, and serves everyone else. Unbounded, the server would
    hold all 15 waves x 40 x 64 KiB = 37.5 MiB of replies."""
    waves, per_wave, size = 15, 40, 64 * 1024
    with (
        ChildServer("test-server", ["--max-outgoing", str(256 * 1024)], tmp_path / "log") as child,
        Client(child.address, reconnect=False) as normal,
    ):
        assert normal.call("rpc.ping") == "pong"
        baseline = child.rss_kib()
        sent = 0
        with Raw(child.address, rcvbuf=4096) as hog:
            for wave in range(waves):
                try:
                    hog.send(
                        b"".join(
                            request_line("big", [size], id=f"{wave}-{i}") for i in range(per_wave)
                        )
                    )
                except OSError:
                    break  # the server has closed it
                sent += per_wave
                # the wave is answered (its replies written or refused) before the next one
                wait_until(lambda: wave_done(normal), what="the wave answered")
                if dropped(normal):
                    break
            assert dropped(normal) == 1, "closed with reason outgoing_buffer"
            assert sent <= 2 * per_wave, f"dropped only after {sent} requests"
            wait_until(lambda: normal.call("rpc.stats")["requests_in_flight"] == 1)
            grown = child.rss_kib() - baseline
        assert grown < 16 * 1024, f"server RSS grew by {grown} KiB"
        assert normal.call("big", [size]) == "x" * size
        wait_until(lambda: normal.call("rpc.stats")["connections"] == 1)


def wave_done(client: Client) -> bool:
    snapshot = client.call("rpc.stats")
    return snapshot["requests_in_flight"] == 1 or bool(
        snapshot["closed_by_reason"].get("outgoing_buffer")
    )


def dropped(client: Client) -> int:
    return client.call("rpc.stats")["closed_by_reason"].get("outgoing_buffer", 0)


def test_replies_queued_in_one_loop_iteration_stay_under_the_flush_unit(monkeypatch):
    """White-box: replies produced in one burst are handed to the transport every 64 KiB, so
    max_outgoing is checked before more pile up (600 x 64 KiB arrive in one burst here)."""
    from controller.server import connection as server_module

    queued: list[int] = []
    real_flush = server_module.Connection._flush

    def spy(self: server_module.Connection) -> None:
        queued.append(sum(map(len, self._out)))
        real_flush(self)

    monkeypatch.setattr(server_module.Connection, "_flush", spy)
    limits = Limits(max_outgoing=256 * 1024, max_inflight=1000, max_queue=1000)
    with serve(limits=limits) as server, Raw(server.address, rcvbuf=4096) as hog:
        hog.send(b"".join(request_line("big", [65536], id=i) for i in range(600)))
        wait_until(lambda: stats(server.address)["closed_by_reason"], what="the hog dropped")
        wait_until(lambda: stats(server.address)["requests_in_flight"] == 1)
        assert stats(server.address)["closed_by_reason"] == {"outgoing_buffer": 1}
    assert max(queued) <= server_module.FLUSH_AT + 65536 + 100


def test_outgoing_buffer_of_a_callback_link_that_stops_reading():
    with serve(limits=Limits(max_outgoing=256 * 1024)) as server, Raw(server.address) as raw:
        sink = listener()
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with sink:
            raw.call("rpc.hello", {"callback_port": sink.getsockname()[1]})
            raw.send(b"".join(request_line("big", [65536], id=i) for i in range(200)))
            assert raw.closed(WAIT)
            snapshot = stats(server.address)
            assert snapshot["closed_by_reason"]["outgoing_buffer"] == 1
        assert ping_ok(server.address)


def test_max_subscriptions():
    with serve(limits=Limits(max_subscriptions=2)) as server, Raw(server.address) as raw:
        for method in ("a.one", "a.two", "a.two"):  # renewing one is not a new one
            assert raw.call("rpc.subscribe", {"method": method})["result"] == {"subscribed": method}
        reply = raw.call("rpc.subscribe", {"method": "a.three"})
        assert error_code(reply) == BUSY
        assert "too many subscriptions (limit 2)" in reply["error"]["message"]
        assert raw.call("rpc.unsubscribe", {"method": "a.one"})["result"]
        assert "result" in raw.call("rpc.subscribe", {"method": "a.three"})
        assert ping_ok(server.address)


def test_stats_reports_connections_inflight_totals_and_errors():
    with serve() as server, Client(server.address, reconnect=False) as client:
        base = client.call("rpc.stats")
        assert base["connections"] == 1 and base["requests_in_flight"] == 1
        hung: Future[object] = client.send_command("hang", [30], timeout=WAIT)
        for bad in ("nope", "fail"):
            with pytest.raises(Exception):  # noqa: B017 - any error; codes checked below
                client.call(bad)
        with Raw(server.address) as raw:
            raw.send_line(b"{not json")
            assert error_code(raw.json()) == PARSE_ERROR
            now = client.call("rpc.stats")
            assert now["connections"] == 2
            assert now["requests_in_flight"] == 2  # hang + this stats call
            assert now["requests_total"] == base["requests_total"] + 4
            assert now["errors_by_code"] == {
                str(ek.PARSE_ERROR): 1,
                str(ek.METHOD_NOT_FOUND): 1,
                str(ek.DEVICE_FAULT): 1,
            }
            assert set(now) >= {
                "connections_total",
                "replies_total",
                "closed_by_reason",
                "late_outcomes",
                "worker_queue",
                "uptime",
                "limits",
            }
        server.test_release.set()
        assert hung.result(timeout=WAIT) == "released"
        wait_until(lambda: client.call("rpc.stats")["connections"] == 1)


# -- documented and configurable -------------------------------------------------------------
LIMIT_OPTIONS = {
    "max_connections",
    "max_inflight",
    "max_queue",
    "max_frame",
    "max_batch",
    "max_depth",
    "idle_timeout",
    "frame_timeout",
    "handshake_timeout",
    "max_outgoing",
}


def test_every_limit_is_documented_with_its_default():
    text = (REPO / "docs" / "reliability.md").read_text()
    for field in dataclasses.fields(Limits):
        default = field.default
        assert f"`{field.name}`" in text, f"{field.name} is not in docs/reliability.md"
        row = next(line for line in text.splitlines() if f"`{field.name}`" in line)
        shown = {int: lambda v: [str(v), f"{v:,}"], float: lambda v: [f"{v:g}"]}[type(default)](
            default
        )
        assert any(re.search(rf"\b{re.escape(s)}\b", row) for s in shown), (field.name, row)


def test_every_bound_is_a_serve_option():
    serve_parser = cli.build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    dests = {action.dest: action.default for action in serve_parser._actions}
    defaults = Limits()
    for name in LIMIT_OPTIONS:
        assert name in dests, f"statelink serve has no --{name.replace('_', '-')}"
        assert dests[name] == getattr(defaults, name), name


# -- one reply too large, one reply large, a listener that only listens (issue 11) -------------
def test_a_result_too_large_for_a_frame_is_an_error_and_the_connection_carries_on():
    limit = 64 * 1024
    with serve(limits=Limits(max_frame=limit)) as server, Raw(server.address) as raw:
        raw.request("big", [3 * limit], id="big")
        raw.request("echo", ["after"], id="after")
        replies = {reply["id"]: reply for reply in (raw.json(), raw.json())}
        error = replies["big"]["error"]
        assert ek.kind_of(error["code"]) == "internal_error"
        size = 3 * limit + len('{"jsonrpc":"2.0","id":"big","result":""}')
        assert error["data"] == {"size": size, "limit": limit}
        assert str(size) in error["message"] and str(limit) in error["message"]
        assert replies["after"]["result"] == "after"
        assert raw.call("echo", ["still open"])["result"] == "still open"
        assert "outgoing_buffer" not in stats(server.address)["closed_by_reason"]


def test_a_batch_whose_replies_together_exceed_a_frame_keeps_what_fits():
    limit = 64 * 1024
    with serve(limits=Limits(max_frame=limit)) as server, Raw(server.address) as raw:
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "big", "params": [40 * 1024]},
            {"jsonrpc": "2.0", "id": 2, "method": "big", "params": [30 * 1024]},
            {"jsonrpc": "2.0", "id": 3, "method": "echo", "params": ["small"]},
        ]
        raw.send_json(batch)
        line = raw.line()
        assert len(line) <= limit
        replies = {reply["id"]: reply for reply in json.loads(line)}
        assert replies[1]["error"]["data"]["limit"] == limit  # the largest gave way
        assert replies[2]["result"] == "x" * 30 * 1024
        assert replies[3]["result"] == "small"
        assert raw.call("rpc.ping")["result"] == "pong"


def test_one_reply_up_to_a_frame_never_trips_max_outgoing():
    """max_outgoing bounds a backlog: one reply larger than it (but within a frame) is
    written, however slowly the client reads."""
    limits = Limits(max_outgoing=16 * 1024, max_frame=512 * 1024)
    with serve(limits=limits) as server, Raw(server.address, rcvbuf=4096) as raw:
        reply = raw.call("big", [400 * 1024], id="big")
        assert reply["result"] == "x" * 400 * 1024
        assert raw.call("rpc.ping")["result"] == "pong"
        assert "outgoing_buffer" not in stats(server.address)["closed_by_reason"]


def test_a_subscriber_that_only_listens_is_not_idle_while_notifications_flow(tmp_path):
    from reliability_helpers import write_device

    from statemachines.device import load_device

    idle = 0.4
    traffic = 5 * idle
    with serve(limits=Limits(idle_timeout=idle)) as server:
        add_device(server, load_device(write_device(tmp_path)))
        with Raw(server.address) as listener, Client(server.address, reconnect=False) as driver:
            assert listener.call("rpc.subscribe", {"method": "device.state"})["result"]
            sent = 0
            deadline = time.monotonic() + traffic
            while time.monotonic() < deadline:  # busy for several idle timeouts
                driver.call("testdev.slow", {"seconds": 0}, timeout=WAIT)  # idle-busy-idle
                sent += 1
            received = 0
            while received < 2 * sent:
                line = listener.try_line(timeout=WAIT)
                assert line is not None, f"closed after {received} of {2 * sent} notifications"
                received += 1
            assert listener.closed(WAIT), "idle (and closed) once the notifications stop"
        assert stats(server.address)["closed_by_reason"]["idle_timeout"] >= 1
