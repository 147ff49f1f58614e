"""The device side of a fleet (issue 13, docs/fleet.md): a server's core served as a node
through a real Mosquitto (:class:`controller.mqtt.node.MqttNode`, ``statelink serve
--broker``). The requests come from a raw paho MQTT 5 client (:class:`Requester`), so what is
checked is the wire: Response Topic, Correlation Data, Message Expiry, retained documents.

In-process servers for the request/reply rules; real ``statelink serve`` processes for
kill -9, clean stops and restarts. Every node has a name of its own (sessions and retained
messages outlive a test in the shared broker).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mosquitto import Mosquitto, free_port
from paho.mqtt.subscribeoptions import SubscribeOptions
from reliability_helpers import executions, write_counting_device
from support import WAIT, RawConnection, ServeProcess, statelink, wait_until

from controller import CommandServer
from controller.devices import add_device
from controller.mqtt.connection import connect_properties, publish_properties
from controller.mqtt.node import MqttNode
from controller.mqtt.options import MqttOptions
from controller.mqtt.packing import packed
from controller.server import Call, FunctionCommand, Limits
from statemachines import errorkinds as ek
from statemachines.addresses import parse_broker
from statemachines.device import load_device


# -- a raw MQTT 5 requester --------------------------------------------------------------------
@dataclass
class Msg:
    topic: str
    payload: bytes
    correlation: bytes | None
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


class Requester:
    """A paho MQTT 5 client publishing requests (Response Topic = its reply topic, Correlation
    Data, Message Expiry, User Properties as asked) and keeping every message it receives, on
    its reply topic and on the ``watch`` filters."""

    def __init__(self, url: str, *watch: str, prefix: str = "statelink") -> None:
        broker = parse_broker(url)
        self.prefix = prefix
        self.reply_topic = f"{prefix}/_reply/test{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.received: list[Msg] = []
        self.cond = threading.Condition()
        self._numbers = iter(range(1, 1 << 30))
        connected, subscribed = threading.Event(), threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(WAIT), "no CONNACK"
        filters = [self.reply_topic, *watch]
        self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        assert subscribed.wait(WAIT), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        msg = Msg(
            m.topic,
            bytes(m.payload),
            getattr(m.properties, "CorrelationData", None),
            bool(m.retain),
            m.qos,
        )
        with self.cond:
            self.received.append(msg)
            self.cond.notify_all()

    def send(
        self,
        node: str,
        payload: Any,
        *,
        correlation: bytes | None = None,
        expiry: int | None = 30,
        progress: bool = False,
        reply: bool = True,
    ) -> bytes:
        """Publish ``payload`` (bytes as they are, anything else as JSON) to NODE's rpc topic,
        QoS 1; the Correlation Data used (a fresh one unless given)."""
        if correlation is None:
            correlation = next(self._numbers).to_bytes(4, "big")
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        props = publish_properties(
            response_topic=self.reply_topic if reply else None,
            correlation=correlation,
            expiry=expiry,
            user=[("progress", "1")] if progress else None,
        )
        info = self.client.publish(f"{self.prefix}/{node}/rpc", data, qos=1, properties=props)
        info.wait_for_publish(WAIT)
        return correlation

    def wait_for(self, match: Callable[[Msg], bool], timeout: float = WAIT) -> Msg:
        """The first message received that ``match``es (taken off the list)."""
        with self.cond:
            found: list[Msg] = []

            def ready() -> bool:
                found[:] = [m for m in self.received if match(m)][:1]
                return bool(found)

            if not self.cond.wait_for(ready, timeout):
                raise AssertionError(f"no matching message within {timeout} s: {self.received}")
            self.received.remove(found[0])
            return found[0]

    def reply(self, correlation: bytes, timeout: float = WAIT) -> Any:
        msg = self.wait_for(
            lambda m: m.topic == self.reply_topic and m.correlation == correlation, timeout
        )
        assert msg.qos == 1 and not msg.retain
        assert not msg.payload.endswith(b"\n"), "one JSON text"
        return msg.json()

    def call(self, node: str, method: str, params: Any = None, id: Any = 1, **kw: Any) -> Any:
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            request["params"] = params
        return self.reply(self.send(node, request, **kw))

    def on(self, topic: str, **fields: Any) -> Msg:
        """The next message on ``topic`` whose JSON payload has ``fields``."""
        return self.wait_for(
            lambda m: m.topic == topic and all(m.json().get(k) == v for k, v in fields.items())
        )

    def replies_to(self, correlation: bytes) -> list[Msg]:
        with self.cond:
            return [
                m
                for m in self.received
                if m.topic == self.reply_topic and m.correlation == correlation
            ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def request(method: str, params: Any = None, id: Any = 1, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method, **extra}
    if params is not None:
        message["params"] = params
    return message


def fresh_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def requester(broker: Any) -> Iterator[Requester]:
    req = Requester(broker.url, "statelink/+/status", "statelink/+/state/+")
    yield req
    req.close()


@pytest.fixture
def make_node(broker: Any, release: threading.Event) -> Iterator[Callable[..., MqttNode]]:
    """``make_node(server=None, name=None, url=None)``: a started MqttNode on a started
    ``CommandServer(port=None)`` (or on ``server``); stopped at teardown."""
    servers: list[CommandServer] = []

    def make(
        server: CommandServer | None = None, name: str | None = None, url: str | None = None
    ) -> MqttNode:
        if server is None:
            server = CommandServer(port=None, grace=1.0)
        node = MqttNode(server, url or broker.url, name or fresh_name())
        if not server.running:
            server.start()
        servers.append(server)
        return node

    yield make
    release.set()
    for server in servers:
        server.stop(grace=0.5)


def echo_server(**kwargs: Any) -> CommandServer:
    server = CommandServer(port=None, grace=1.0, **kwargs)

    @server.command("echo")
    def echo(value: Any = None) -> Any:
        return value

    return server


# -- request / reply ---------------------------------------------------------------------------
def test_a_request_is_answered_on_its_response_topic_with_its_correlation_data(
    make_node, requester
) -> None:
    node = make_node(echo_server())
    correlation = requester.send(
        node.node, request("echo", {"value": 42}, id="a"), correlation=b"\x00\xffcorr"
    )
    assert requester.reply(correlation) == {"jsonrpc": "2.0", "id": "a", "result": 42}
    # a trailing newline (a line-oriented peer) is fine; the reply is one JSON text all the same
    correlation = requester.send(node.node, json.dumps(request("echo", [7], id=2)).encode() + b"\n")
    assert requester.reply(correlation)["result"] == 7
    # answered messages leave the core: only the node's own notification peer stays
    wait_until(lambda: len(node.server.sessions) == 1, what="sessions to leave the core")
    # the node's client runs on the server's loop: no network thread of its own
    names = [thread.name for thread in threading.enumerate()]
    assert not [name for name in names if name.endswith(node.client_id)], names


def test_a_batch_gets_one_array_reply(make_node, requester) -> None:
    node = make_node(echo_server())
    batch = [
        request("echo", [1], id=1),
        {"jsonrpc": "2.0", "method": "echo", "params": [2]},  # a notification: no reply
        {"jsonrpc": "2.0", "id": 3},  # not a request
        request("nope", id=4),
    ]
    replies = requester.reply(requester.send(node.node, batch))
    assert isinstance(replies, list) and len(replies) == 3
    by_id = {reply["id"]: reply for reply in replies}
    assert by_id[1]["result"] == 1
    assert by_id[3]["error"]["code"] == ek.INVALID_REQUEST
    assert by_id[4]["error"]["code"] == ek.METHOD_NOT_FOUND


def test_malformed_payloads_get_the_errors_tcp_gives(make_node, requester) -> None:
    server = echo_server(limits=Limits(max_frame=200))
    node = make_node(server)
    parse_error = requester.reply(requester.send(node.node, b'{"jsonrpc": "2.0", "id": 1,'))
    assert parse_error["id"] is None and parse_error["error"]["code"] == ek.PARSE_ERROR
    not_utf8 = requester.reply(requester.send(node.node, b"\xff\xfe"))
    assert not_utf8["error"]["code"] == ek.PARSE_ERROR
    invalid = requester.reply(requester.send(node.node, {"jsonrpc": "1.0", "id": 5}))
    assert invalid["id"] == 5 and invalid["error"]["code"] == ek.INVALID_REQUEST
    empty = requester.reply(requester.send(node.node, b""))
    assert empty["error"]["code"] == ek.INVALID_REQUEST
    assert empty["error"]["data"] == {"reason": "empty message"}
    too_long = requester.reply(requester.send(node.node, request("echo", ["x" * 300])))
    assert too_long["error"]["code"] == ek.INVALID_REQUEST
    assert too_long["error"]["data"] == {"max_frame": 200}
    # the node goes on serving
    assert requester.call(node.node, "echo", [1])["result"] == 1


def test_a_request_without_response_topic_runs_and_its_reply_is_dropped(
    make_node, requester
) -> None:
    server = CommandServer(port=None, grace=1.0)
    ran = threading.Event()

    @server.command("mark")
    def mark() -> str:
        ran.set()
        return "marked"

    node = make_node(server)
    requester.send(node.node, request("mark"), reply=False)
    assert ran.wait(WAIT)
    assert requester.call(node.node, "rpc.ping")["result"] == "pong"
    assert [m for m in requester.received if m.topic == requester.reply_topic] == []


def test_a_retained_request_never_runs(make_node, requester, broker) -> None:
    server = CommandServer(port=None, grace=1.0)
    ran = threading.Event()
    server.add_command("mark", lambda: ran.set())
    name = fresh_name()
    topic = f"statelink/{name}/rpc"
    info = requester.client.publish(topic, json.dumps(request("mark")), qos=1, retain=True)
    info.wait_for_publish(WAIT)
    try:
        node = make_node(server, name=name)  # subscribes: the broker sends the retained one
        assert requester.call(node.node, "rpc.ping")["result"] == "pong"
        assert not ran.is_set()
    finally:
        requester.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(WAIT)


def blocking_server(release: threading.Event, **kwargs: Any) -> tuple[CommandServer, list[Any]]:
    """A server whose ``hold`` command blocks until ``release``; ``started``: the ``n`` of
    every ``hold`` that started."""
    server = CommandServer(port=None, grace=1.0, **kwargs)
    started: list[Any] = []

    @server.command("hold", timeout=60)
    def hold(n: int = 0) -> str:
        started.append(n)
        release.wait(WAIT)
        return "released"

    return server, started


def test_rpc_cancel_finds_the_requests_of_its_own_controller(make_node, broker, release) -> None:
    server, started = blocking_server(release)
    node = make_node(server)
    mine, other = Requester(broker.url), Requester(broker.url)
    try:
        held = mine.send(node.node, request("hold", {"n": 1}, id=7))
        wait_until(lambda: started, what="the held command to start")
        # another controller's rpc.cancel does not see it (ids are per controller)
        refused = other.call(node.node, "rpc.cancel", {"id": 7}, id=1)
        assert refused["result"]["cancelled"] is False
        assert mine.call(node.node, "rpc.cancel", {"id": 7}, id=8)["result"] == {"cancelled": True}
        assert mine.reply(held)["error"]["code"] == ek.CANCELLED
    finally:
        release.set()
        mine.close()
        other.close()


def test_ids_in_flight_and_the_inflight_bound_are_per_controller(
    make_node, broker, release
) -> None:
    server, started = blocking_server(release, limits=Limits(max_inflight=2))
    node = make_node(server)
    first, second = Requester(broker.url), Requester(broker.url)
    try:
        a = first.send(node.node, request("hold", {"n": 1}, id=1))
        duplicate = first.reply(first.send(node.node, request("hold", {"n": 2}, id=1)))
        assert duplicate["error"]["code"] == ek.INVALID_REQUEST  # id 1 is in flight here
        b = first.send(node.node, request("hold", {"n": 3}, id=2))
        busy = first.reply(first.send(node.node, request("hold", {"n": 4}, id=3)))
        assert busy["error"]["code"] == ek.BUSY
        assert busy["error"]["data"]["max_inflight"] == 2
        # another controller has a bound of its own, and may use the same ids
        c = second.send(node.node, request("hold", {"n": 5}, id=1))
        wait_until(lambda: len(started) == 3, what="three held commands")
        release.set()
        for requester, correlation in ((first, a), (first, b), (second, c)):
            assert requester.reply(correlation)["result"] == "released"
    finally:
        release.set()
        first.close()
        second.close()


def test_a_second_copy_of_a_request_in_flight_is_dropped(make_node, requester, release) -> None:
    server, started = blocking_server(release)
    node = make_node(server)
    message = request("hold", {"n": 1}, id=1)
    correlation = requester.send(node.node, message)
    wait_until(lambda: started, what="the held command to start")
    requester.send(node.node, message, correlation=correlation)  # a QoS 1 redelivery
    assert requester.call(node.node, "rpc.ping", id=2)["result"] == "pong"  # it was taken
    release.set()
    assert requester.reply(correlation)["result"] == "released"
    assert requester.call(node.node, "rpc.ping", id=3)["result"] == "pong"
    assert len(started) == 1 and requester.replies_to(correlation) == []
    assert node.dropped == 1


def test_progress_only_when_asked_for(make_node, requester) -> None:
    server = CommandServer(port=None, grace=1.0)

    class WithProgress(FunctionCommand):
        def start(self, call: Call) -> None:
            call.progress(0.5, "half way")
            server.loop.call_soon(call.resolve, "done")  # after the progress (call_soon)

    server.register("job", WithProgress(server, "job", lambda: None, None, None))
    node = make_node(server)
    asked = requester.send(node.node, request("job", id="p"), progress=True)
    progress = requester.wait_for(lambda m: m.correlation == asked and b'"method"' in m.payload)
    assert progress.qos == 0 and progress.json() == {
        "jsonrpc": "2.0",
        "method": "rpc.progress",
        "params": {"id": "p", "progress": 0.5, "message": "half way"},
    }
    assert requester.reply(asked)["result"] == "done"
    silent = requester.send(node.node, request("job", id="q"))
    assert requester.reply(silent)["result"] == "done"
    assert requester.call(node.node, "rpc.ping")["result"] == "pong"
    assert requester.replies_to(silent) == []  # no progress without progress=1


def test_mqtt_requests_are_served_as_authenticated(make_node, requester) -> None:
    node = make_node(echo_server(secret="tcp-only"))
    assert requester.call(node.node, "echo", [3])["result"] == 3


# -- retained documents ------------------------------------------------------------------------
def test_status_discover_and_state_are_retained_and_states_follow_changes(
    make_node, broker, tmp_path
) -> None:
    server = CommandServer(port=None, grace=1.0)
    add_device(server, load_device(write_counting_device(tmp_path, "counter")))
    node = make_node(server)
    name = node.node
    late = Requester(broker.url, f"statelink/{name}/#")  # subscribes after the node started
    try:
        status = late.on(f"statelink/{name}/status")
        assert status.retain and status.qos == 1
        online = status.json()
        assert online["online"] is True and online["node"] == name
        assert online["devices"] == ["counter"] and online["protocol"] == "1.0"
        assert online["max_inflight"] == 256 and "since" in online and online["version"]
        discover = late.on(f"statelink/{name}/discover")
        assert discover.retain
        assert [d["name"] for d in discover.json()["x-devices"]] == ["counter"]
        state = late.on(f"statelink/{name}/state/counter")
        assert state.retain and state.json() == {
            "device": "counter",
            "state": "idle",
            "previous": "idle",
            "command": None,
        }
        assert late.call(name, "counter.work", {"tag": "x"})["result"]["tag"] == "x"
        busy = late.on(f"statelink/{name}/state/counter", state="busy")
        idle = late.on(f"statelink/{name}/state/counter", state="idle")
        assert not busy.retain and not idle.retain  # changes, not the state at subscribe
        assert idle.json() == {
            "device": "counter",
            "state": "idle",
            "previous": "busy",
            "command": "work",
        }
    finally:
        late.close()
    again = Requester(broker.url, f"statelink/{name}/state/+")
    try:  # the broker keeps the newest state
        assert again.on(f"statelink/{name}/state/counter").json()["command"] == "work"
    finally:
        again.close()


def test_other_notifications_go_to_event_topics(make_node, broker) -> None:
    server = CommandServer(port=None, grace=1.0)
    node = make_node(server)
    watcher = Requester(broker.url, f"statelink/{node.node}/event/#")
    try:
        server.call_soon(server.publish, "door.opened", {"door": 1})
        event = watcher.wait_for(lambda m: m.topic.endswith("/event/door.opened"))
        assert event.json() == {"door": 1} and event.qos == 0 and not event.retain
    finally:
        watcher.close()


def test_a_clean_stop_answers_what_is_in_flight_then_says_stopped(
    broker, requester, release
) -> None:
    server, started = blocking_server(release)
    node = MqttNode(server, broker.url, fresh_name())
    server.start()
    try:
        held = requester.send(node.node, request("hold", id=1))
        wait_until(lambda: started, what="the held command to start")
    finally:
        server.stop(grace=0)
    stopped = requester.on(f"statelink/{node.node}/status", online=False).json()
    assert stopped["reason"] == "stopped" and stopped["node"] == node.node
    assert datetime.fromisoformat(stopped["at"]).tzinfo is not None  # ISO-8601, UTC
    # the call in flight had its one outcome before that (the broker keeps the node's order)
    [reply] = requester.replies_to(held)
    assert reply.json()["error"]["code"] == ek.CANCELLED
    assert reply.json()["error"]["data"]["reason"] == "shutdown"
    assert server.stats.late_outcomes == 0


def test_requests_sent_while_the_node_is_away_run_when_it_is_back_unless_expired(
    make_node, broker, requester, tmp_path
) -> None:
    server = CommandServer(port=None, grace=1.0)
    add_device(server, load_device(write_counting_device(tmp_path, "counter")))
    node = make_node(server)  # the broker now keeps a session for it
    server.stop()
    expired = requester.send(node.node, request("counter.work", {"tag": "stale"}, id=1), expiry=1)
    kept = requester.send(node.node, request("counter.work", {"tag": "kept"}, id=2), expiry=60)
    threading.Event().wait(3.0)  # time passes: the first request's expiry (1 s) runs out
    server.start()
    assert requester.reply(kept)["result"]["tag"] == "kept"
    assert requester.call(node.node, "rpc.ping", id=3)["result"] == "pong"
    assert [e["tag"] for e in executions(tmp_path)] == ["kept"]
    assert requester.replies_to(expired) == []


def test_keyed_request_delivered_twice_runs_once(make_node, requester, tmp_path) -> None:
    server = CommandServer(port=None, grace=1.0)
    add_device(server, load_device(write_counting_device(tmp_path, "counter")))
    node = make_node(server)
    message = request("counter.work", {"tag": "once"}, id=1, key="k-once")
    first = requester.reply(requester.send(node.node, message))
    second = requester.reply(requester.send(node.node, message))  # e.g. resent after a reconnect
    assert second["result"] == first["result"] and second.get("replayed") is True
    assert len(executions(tmp_path, tag="once")) == 1


# -- the server's lifecycle --------------------------------------------------------------------
def test_a_server_without_port_has_no_tcp_address_and_restarts(make_node, requester) -> None:
    server = echo_server()
    node = make_node(server)
    with pytest.raises(RuntimeError, match="no TCP socket"):
        _ = server.address
    assert requester.call(node.node, "echo", [1])["result"] == 1
    server.stop()
    assert requester.on(f"statelink/{node.node}/status", online=False)
    server.start()
    assert requester.on(f"statelink/{node.node}/status", online=True)
    assert requester.call(node.node, "echo", [2])["result"] == 2


def test_an_unreachable_broker_fails_the_start_and_leaves_nothing_running() -> None:
    server = echo_server()
    MqttNode(server, f"mqtt://127.0.0.1:{free_port()}", "n1", MqttOptions(connect_timeout=2))
    with pytest.raises(ConnectionError, match="cannot reach the MQTT broker"):
        server.start()
    assert not server.running
    assert [t.name for t in threading.enumerate() if t.name.startswith("statelink-io")] == []


def test_a_session_kept_without_the_subscription_does_not_leave_the_node_deaf(
    make_node, broker, requester
) -> None:
    """E.g. the ACL refused the subscription at the last start, and was fixed since."""
    name = fresh_name()
    server = echo_server()
    probe = MqttNode(server, broker.url, name)  # not started: only for its client id
    server.transports.clear()
    host_port = parse_broker(broker.url)
    squatter = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=probe.client_id, protocol=mqtt.MQTTv5
    )
    connected = threading.Event()
    squatter.on_connect = lambda *_a: connected.set()
    squatter.connect(
        host_port.host, host_port.port, clean_start=True, properties=connect_properties(3600)
    )
    squatter.loop_start()
    try:
        assert connected.wait(WAIT)  # the broker now keeps a session with no subscription
    finally:
        squatter.disconnect()
        squatter.loop_stop()
    node = make_node(server, name=name)
    assert requester.call(node.node, "echo", ["heard"])["result"] == "heard"


def test_two_nodes_on_one_server(make_node, requester) -> None:
    server = echo_server()
    one = make_node(server)
    two = make_node(server)
    assert requester.call(one.node, "echo", ["one"])["result"] == "one"
    assert requester.call(two.node, "echo", ["two"])["result"] == "two"


def test_the_node_reconnects_after_a_broker_restart(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="statelink.mqtt")
    with Mosquitto(tmp_path / "broker") as own:
        server = echo_server()
        node = MqttNode(server, own.url, fresh_name())
        with server:
            watcher = Requester(own.url)
            try:
                assert watcher.call(node.node, "echo", [1])["result"] == 1
            finally:
                watcher.close()
            own.stop()  # persistence keeps the node's session and the retained status
            wait_until(  # a reconnect failed: the broker is away for a while
                lambda: any("trying again" in r.getMessage() for r in caplog.records),
                what="a failed reconnect",
            )
            own.start()
            watcher = Requester(own.url)
            try:  # sent at once: the broker keeps it for the node until it is back
                assert watcher.call(node.node, "echo", [2])["result"] == 2
            finally:
                watcher.close()


def test_packed_properties_are_what_paho_packs() -> None:
    cases: list[dict[str, Any]] = [
        {"correlation": b"\x00\x01abc"},
        {"correlation": b"x" * 200, "response_topic": "p/_reply/ab", "expiry": 3},
        {"response_topic": "t", "user": [("progress", "1"), ("a", "b")], "expiry": 0},
        {},
    ]
    for case in cases:
        assert packed(**case).pack() == publish_properties(**case).pack(), case


# -- statelink serve --broker ------------------------------------------------------------------
def test_serve_over_mqtt_only_and_the_will_on_kill_9(broker, requester, tmp_path) -> None:
    name = fresh_name()
    device = write_counting_device(tmp_path, "counter")
    node = ServeProcess("--broker", broker.url, "--node", name, "--device", str(device), port=None)
    try:
        assert node.node == name and node.broker == broker.url and node.address == ("", 0)
        assert requester.on(f"statelink/{name}/status", online=True).json()["devices"] == [
            "counter"
        ]
        assert requester.call(name, "counter.work", {"tag": "a"})["result"]["tag"] == "a"
    finally:
        node.kill()
    # The Will: published as soon as the broker sees the connection drop, not after the
    # keepalive runs out (10 s x 1.5): a bound well below that tells the two apart.
    lost = requester.wait_for(
        lambda m: m.topic == f"statelink/{name}/status" and not m.json()["online"], timeout=5
    )
    assert lost.json() == {"online": False, "node": name, "reason": "lost"}
    later = Requester(broker.url, f"statelink/{name}/status")
    try:  # and it is what the broker keeps
        assert later.on(f"statelink/{name}/status", reason="lost").retain
    finally:
        later.close()


def test_serve_with_port_and_broker_serves_both_and_stops_cleanly(broker, requester) -> None:
    name = fresh_name()
    node = ServeProcess(
        "--broker", broker.url, "--node", name, "--device", "config/devices/demo.yaml", "--simulate"
    )
    try:
        with RawConnection(node.address) as conn:
            assert conn.call("demo.state", id=1)["result"]["state"] == "idle"
        assert requester.call(name, "demo.state")["result"]["state"] == "idle"
    finally:
        assert node.stop() == 0
    stopped = requester.on(f"statelink/{name}/status", online=False).json()
    assert stopped["reason"] == "stopped"


def test_a_restarted_node_gets_what_was_sent_while_it_was_gone(broker, requester, tmp_path) -> None:
    name = fresh_name()
    device = write_counting_device(tmp_path, "counter")
    args = ("--broker", broker.url, "--node", name, "--device", str(device))
    args += ("--state-dir", str(tmp_path / "state"))
    ServeProcess(*args, port=None).kill()
    requester.on(f"statelink/{name}/status", online=False)
    queued = requester.send(name, request("counter.work", {"tag": "queued"}, key="k-q"))
    node = ServeProcess(*args, port=None)
    try:
        assert requester.reply(queued)["result"]["tag"] == "queued"
        again = requester.send(name, request("counter.work", {"tag": "queued"}, key="k-q"))
        assert requester.reply(again).get("replayed") is True
    finally:
        node.stop()
    assert len(executions(tmp_path, tag="queued")) == 1


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--node", "_bad"), 2, "--node: bad node name"),
        (("--node", "n1", "--topic-prefix", "a/+"), 2, "topic prefix"),
        (("--broker", "http://x"), 2, "--broker"),
        (("--node", "n1", "--port", "0", "--broker-missing"), 2, "unrecognized"),
    ],
)
def test_serve_broker_usage_errors(broker, args, code, says) -> None:
    argv = ["serve", *args] if "--broker" in args else ["serve", "--broker", broker.url, *args]
    done = statelink(*argv, timeout=WAIT)
    assert done.returncode == code, done.stderr
    assert says in done.stderr


def test_serve_node_without_broker_is_a_usage_error() -> None:
    done = statelink("serve", "--node", "n1", timeout=WAIT)
    assert done.returncode == 2 and "give --broker too" in done.stderr


def test_serve_with_an_unreachable_broker_exits_3_with_one_line() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    done = statelink("serve", "--broker", url, "--node", "n1", timeout=WAIT)
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("statelink serve:")]
    assert lines == [f"statelink serve: cannot reach the MQTT broker {url}: Connection refused"]
