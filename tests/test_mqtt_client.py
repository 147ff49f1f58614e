"""The controller side of a fleet over a real Mosquitto: :class:`MqttClient` and its shared
:class:`BrokerLink`, first on the wire against a raw paho responder (what a request looks like,
Correlation Data routing, status, offline, Will, late and undecodable replies, notifications,
a broker restart), then against a real node (:class:`MqttNode`), through ``statelink call`` and
``statelink check``."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mosquitto import Mosquitto, free_port
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from support import WAIT, statelink, wait_until

from controller.client_base import LateOutcome
from controller.errors import (
    ClientTimeoutError,
    ConnectionLostError,
    MethodNotFoundError,
    NodeOfflineError,
    ParseError,
)
from controller.mqtt import connection
from controller.mqtt.broker_link import BrokerLink
from controller.mqtt.client import MqttClient
from controller.mqtt.connection import BrokerError
from controller.mqtt.node import MqttNode
from controller.mqtt.options import MqttOptions
from controller.server import CommandServer
from statemachines import errorkinds as ek
from statemachines.addresses import parse_broker

Reply = Callable[[dict[str, Any]], Any]  #: request -> reply dict, bytes, or None (no reply)


def unique(prefix: str = "n") -> str:
    """A node name no other test uses (retained statuses outlive a test on the shared broker)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request["id"], "result": request.get("params")}


class Responder:
    """A fake node on raw paho: answers ``P/N/rpc`` on each request's Response Topic with its
    Correlation Data (``reply(request)`` says what), keeps every request it got, publishes its
    retained status (online at connect; its Will says offline ``lost``).

    Ready once built: the broker confirmed the subscription to ``P/N/rpc`` (SUBACK) and holds
    the retained status (PUBACK), as a real node is once started. A controller on another
    connection may connect at once: nothing orders two connections' packets but this."""

    def __init__(
        self,
        url: str,
        node: str,
        reply: Reply = echo,
        *,
        online: bool = True,
        persistent: bool = False,
        will: bool = True,
        prefix: str = "statelink",
    ) -> None:
        self.url, self.node, self.reply, self.online = url, node, reply, online
        self.topic = f"{prefix}/{node}"
        self.requests: queue.Queue[tuple[dict[str, Any], Any, int]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        lost = json.dumps({"online": False, "node": node, "reason": "lost"}).encode()
        client_id = f"responder-{node}" if persistent else ""
        self.client = connection.new_client(
            client_id,
            parse_broker(url),
            MqttOptions(),
            will=(f"{self.topic}/status", lost) if will else None,
        )
        self.client.manual_ack_set(True)  # PUBACK before the reply: see _on_message
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self._subscribed = threading.Event()  #: a SUBACK came
        self._announced: mqtt.MQTTMessageInfo | None = None  #: the first online status
        connection.start(
            self.client,
            parse_broker(url),
            MqttOptions(),
            self._on_connect,
            clean_start=not persistent,
            session_expiry=3600 if persistent else 0,
        )  # _on_connect has run
        assert self._subscribed.wait(WAIT), f"no SUBACK for {self.topic}/rpc within {WAIT} s"
        if self._announced is not None:
            self._announced.wait_for_publish(WAIT)
            assert self._announced.is_published(), f"status of {node} not acknowledged"

    def _on_connect(self, _session_present: bool) -> None:  # the paho thread: never wait here
        self.client.subscribe(f"{self.topic}/rpc", qos=1)
        if self.online:
            status = {"online": True, "node": self.node, "max_inflight": 64}
            info = self.client.publish(
                f"{self.topic}/status", json.dumps(status), qos=1, retain=True
            )
            if self._announced is None:
                self._announced = info

    def set_status(self, status: dict[str, Any] | None) -> None:
        payload = b"" if status is None else json.dumps(status).encode()
        self.client.publish(f"{self.topic}/status", payload, qos=1, retain=True).wait_for_publish(
            WAIT
        )

    def publish(self, topic: str, payload: Any, *, retain: bool = False, qos: int = 1) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"{self.topic}/{topic}", data, qos=qos, retain=retain).wait_for_publish(
            WAIT
        )

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # Acknowledged before it is answered (as MqttNode does): once a reply is out, the
        # broker has the PUBACK (one connection's packets stay in order), so a broker stopped
        # after a reply never redelivers its request.
        self.client.ack(msg.mid, msg.qos)
        request = json.loads(msg.payload)
        self.seen.append(request)
        self.requests.put((request, msg.properties, msg.qos))
        reply = self.reply(request)
        if reply is not None:
            self.answer(msg.properties, reply)

    def answer(self, properties: Any, reply: Any, *, qos: int = 1) -> None:
        """Publish ``reply`` (a dict, or raw bytes) as the answer to a request."""
        out = Properties(PacketTypes.PUBLISH)
        out.CorrelationData = properties.CorrelationData
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.client.publish(properties.ResponseTopic, data, qos=qos, properties=out)

    def next_request(self) -> tuple[dict[str, Any], Any, int]:
        try:
            return self.requests.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"node {self.node} got no request within {WAIT} s") from None

    def vanish(self) -> None:
        """Go away as a crashed node does: the broker publishes the Will."""
        self.client.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        self.client.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def responders(broker: Any) -> Iterator[Callable[..., Responder]]:
    made: list[Responder] = []

    def make(node: str | None = None, reply: Reply = echo, **kwargs: Any) -> Responder:
        responder = Responder(broker.url, node or unique(), reply, **kwargs)
        made.append(responder)
        return responder

    yield make
    for responder in made:
        responder.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def make(address: str, **kwargs: Any) -> MqttClient:
        client = MqttClient(address, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def node_url(broker: Any, node: str) -> str:
    return f"{broker.url}/{node}"


# -- the wire ----------------------------------------------------------------------------------
def test_a_request_goes_out_as_the_contract_says(broker, responders, clients):
    node = responders()
    client = clients(node_url(broker, node.node))
    assert client.connected and client.server_info["max_inflight"] == 64
    assert client.call("dev.work", {"n": 1}, timeout=2.5) == {"n": 1}
    request, properties, qos = node.next_request()
    assert qos == 1
    assert properties.ResponseTopic == client.link.reply_topic
    assert properties.ResponseTopic.startswith("statelink/_reply/")
    assert len(properties.CorrelationData) == 12
    assert properties.MessageExpiryInterval == math.ceil(2.5)
    assert not getattr(properties, "UserProperty", None)  # no progress asked for
    assert request["method"] == "dev.work" and request["key"].startswith("mqtt-")
    client.call("rpc.ping", timeout=0.2)  # rpc.* methods carry no key; expiry at least 1 s
    request, properties, _ = node.next_request()
    assert "key" not in request and properties.MessageExpiryInterval == 1
    client.call("dev.work", key="mine")
    assert node.next_request()[0]["key"] == "mine"


def test_progress_is_asked_for_once_subscribed_and_comes_on_the_reply_topic(
    broker, responders, clients
):
    progress = {"jsonrpc": "2.0", "method": "rpc.progress", "params": {"progress": 0.5}}
    node = responders(reply=lambda request: None)
    client = clients(node_url(broker, node.node))
    seen: list[Any] = []
    unsubscribe = client.subscribe("rpc.progress", seen.append)
    future = client.send_command("dev.work", timeout=WAIT)
    request, properties, _ = node.next_request()
    assert properties.UserProperty == [("progress", "1")]
    node.answer(properties, progress, qos=0)
    node.answer(properties, echo(request))
    future.result(WAIT)
    assert seen == [{"progress": 0.5}]  # routed by Correlation Data, before the reply
    unsubscribe()
    client.send_command("dev.work", timeout=WAIT)
    assert not getattr(node.next_request()[1], "UserProperty", None)


def test_a_node_never_seen_or_offline_fails_at_once(broker, responders, clients):
    ghost = unique("ghost")
    client = clients(node_url(broker, ghost))  # connecting is fine: the broker is there
    assert not client.connected and client.server_info == {}
    future = client.send_command("dev.work", timeout=WAIT)
    assert future.done()  # at once, not after the timeout
    error = future.exception()
    assert isinstance(error, NodeOfflineError) and error.kind == "offline"
    assert error.code == ek.OFFLINE and error.data["node"] == ghost
    assert error.data["reason"] == "never seen" and "never seen" in error.message

    node = responders(online=False)
    node.set_status({"online": False, "node": node.node, "reason": "stopped"})
    stopped = clients(node_url(broker, node.node))
    error = stopped.send_command("dev.work").exception(0)
    assert isinstance(error, NodeOfflineError) and error.data["reason"] == "stopped"
    assert node.requests.empty()  # nothing was published to an offline node
    assert not stopped.link.routes


def test_a_node_coming_online_is_seen_and_its_info_taken(broker, responders, clients):
    node = responders(online=False)
    client = clients(node_url(broker, node.node))
    up = threading.Event()
    client.on_connection(lambda connected: connected and up.set())
    assert isinstance(client.send_command("x").exception(0), NodeOfflineError)
    node.set_status({"online": True, "node": node.node, "max_inflight": 7, "devices": ["d"]})
    assert up.wait(WAIT) and client.connected
    assert client.server_info["max_inflight"] == 7
    assert client.call("dev.work", [1]) == [1]


def test_a_will_fails_the_commands_in_flight_and_awaited_late_at_once(broker, responders, clients):
    node = responders(reply=lambda request: None)  # takes requests, never answers
    client = clients(node_url(broker, node.node))
    down = threading.Event()
    client.on_connection(lambda connected: connected or down.set())
    in_flight = client.send_command("dev.work", timeout=600)
    late: queue.Queue[LateOutcome] = queue.Queue()
    timed_out = client.send_command("dev.slow", timeout=0.2, on_late=late.put)
    assert isinstance(timed_out.exception(WAIT), ClientTimeoutError)
    node.next_request(), node.next_request()
    node.vanish()  # the broker publishes its Will
    error = in_flight.exception(WAIT)  # long before its 600 s
    assert isinstance(error, NodeOfflineError) and error.data["reason"] == "lost"
    outcome = late.get(timeout=WAIT)
    assert isinstance(outcome.error, NodeOfflineError) and not outcome.lost
    assert down.wait(WAIT) and not client.connected
    assert client.pending == 0 and not client.link.routes


def test_late_replies_go_to_on_late_and_are_awaited_for_late_wait_at_most(
    broker, responders, clients
):
    node = responders(reply=lambda request: None)
    client = clients(node_url(broker, node.node))
    late: queue.Queue[LateOutcome] = queue.Queue()
    future = client.send_command("dev.slow", timeout=0.2, key="k1", on_late=late.put)
    assert isinstance(future.exception(WAIT), ClientTimeoutError)
    request, properties, _ = node.next_request()
    node.answer(properties, {"jsonrpc": "2.0", "id": request["id"], "result": 5, "replayed": True})
    outcome = late.get(timeout=WAIT)
    assert (outcome.result, outcome.replayed, outcome.key, outcome.lost) == (5, True, "k1", False)

    client.late_wait = 0.2  # a request the broker expired is never answered
    future = client.send_command("dev.slow", timeout=0.2, on_late=late.put)
    assert isinstance(future.exception(WAIT), ClientTimeoutError)
    outcome = late.get(timeout=WAIT)
    assert outcome.lost and outcome.request_id == future.request_id
    assert not client.link.routes


def test_undecodable_mismatched_and_error_replies(broker, responders, clients):
    replies: queue.Queue[Any] = queue.Queue()
    node = responders(reply=lambda request: replies.get(timeout=WAIT)(request))
    client = clients(node_url(broker, node.node))

    replies.put(lambda request: b"{not json")
    error = client.send_command("dev.a", timeout=WAIT).exception(WAIT)
    assert isinstance(error, ParseError) and "cannot be decoded" in error.message
    replies.put(lambda request: {"jsonrpc": "2.0", "id": 999999, "result": 1})
    error = client.send_command("dev.a", timeout=WAIT).exception(WAIT)
    assert isinstance(error, ParseError) and "another id" in error.message
    replies.put(
        lambda request: {
            "jsonrpc": "2.0",
            "id": request["id"],
            "error": {"code": ek.METHOD_NOT_FOUND, "message": "Method not found"},
        }
    )
    error = client.send_command("dev.a", timeout=WAIT).exception(WAIT)
    assert isinstance(error, MethodNotFoundError)
    replies.put(echo)
    assert client.call("dev.a", "fine") == "fine"
    assert not client.link.routes


def test_clients_share_one_link_and_get_only_their_replies(broker, responders):
    one, two = responders(), responders()
    with BrokerLink(broker.url) as link:
        first = MqttClient(node_url(broker, one.node), link=link)
        second = MqttClient(node_url(broker, two.node), link=link)
        futures = [
            (client, i, client.send_command("dev.echo", [client.node, i], timeout=WAIT))
            for i in range(50)
            for client in (first, second)
        ]
        for client, i, future in futures:
            assert future.result(WAIT) == [client.node, i]
        ids = [request["id"] for request in one.seen + two.seen]
        assert len(ids) == len(set(ids)) == 100  # unique per reply topic
        first.close()
        assert link.connected and second.call("dev.echo", "still") == "still"
        second.close()
        assert not link.routes
    with pytest.raises(ValueError, match="not to"):
        MqttClient("mqtt://elsewhere:1883/n1", link=link, connect=False)


def test_device_state_changes_and_events_reach_subscribers(broker, responders, clients):
    node = responders()
    state = {"device": "door", "state": "open", "previous": "open", "command": None}
    node.publish("state/door", state, retain=True)  # the state before anyone subscribed
    client = clients(node_url(broker, node.node))
    changes: queue.Queue[Any] = queue.Queue()
    events: queue.Queue[Any] = queue.Queue()
    stop = client.subscribe("device.state", changes.put)  # the retained state is no change
    client.subscribe("door.alarm", events.put)
    change = {**state, "state": "closed", "previous": "open", "command": "door.close"}
    node.publish("state/door", change, retain=True)
    node.publish("event/door.alarm", {"level": 3}, qos=0)
    assert changes.get(timeout=WAIT) == change
    assert events.get(timeout=WAIT) == {"level": 3}
    stop()
    node.publish("state/door", state, retain=True)
    node.publish("event/door.alarm", {"level": 4}, qos=0)
    assert events.get(timeout=WAIT) == {"level": 4}  # in order: the state came before
    assert changes.empty()
    with pytest.raises(ValueError, match="cannot subscribe"):
        client.subscribe("a/b", print)


def test_rpc_cancel_and_notifications_go_to_the_node(broker, responders, clients):
    node = responders(reply=lambda request: None)
    client = clients(node_url(broker, node.node))
    future = client.send_command("dev.work", timeout=WAIT)
    _, properties, _ = node.next_request()
    client.cancel(future)
    cancel, cancel_properties, _ = node.next_request()
    assert cancel["method"] == "rpc.cancel" and cancel["params"] == {"id": future.request_id}
    assert cancel_properties.ResponseTopic == properties.ResponseTopic  # the same controller
    assert client.notify("dev.hint", {"x": 1})
    hint, hint_properties, _ = node.next_request()
    assert hint == {"jsonrpc": "2.0", "method": "dev.hint", "params": {"x": 1}}
    assert not getattr(hint_properties, "ResponseTopic", None)


def test_an_unreachable_broker_is_a_broker_error():
    options = MqttOptions(connect_timeout=2.0)
    with pytest.raises(BrokerError, match=r"cannot reach|did not answer"):
        MqttClient(f"mqtt://127.0.0.1:{free_port()}/n1", options=options)


# -- broker loss -------------------------------------------------------------------------------
def test_a_broker_restart_delivers_fresh_requests_and_never_stale_ones(tmp_path, monkeypatch):
    """Requests published while the broker is away wait in paho's queue: a fresh one reaches
    the node after the restart, one whose deadline passed meanwhile never goes out; beyond the
    queue's bound a command fails at once (connection_lost)."""
    monkeypatch.setattr(connection, "MAX_QUEUED", 2)
    with Mosquitto(tmp_path / "broker") as own:
        # no Will: Mosquitto publishes the Wills of its clients when it stops (a node would
        # be offline meanwhile, and its commands fail at once: test_mqtt_workflow.py)
        node = Responder(own.url, unique(), persistent=True, will=False)
        client: MqttClient | None = None
        try:
            client = MqttClient(f"{own.url}/{node.node}", options=MqttOptions(keepalive=2))
            down = threading.Event()
            up = threading.Event()
            client.on_connection(lambda connected: (up if connected else down).set())
            assert client.call("dev.a", "before") == "before"
            node.next_request()
            own.stop()
            assert down.wait(WAIT)
            late: queue.Queue[LateOutcome] = queue.Queue()
            client.late_wait = 1.0
            stale = client.send_command("dev.stale", timeout=0.5, on_late=late.put)
            # its deadline leaves room for both reconnects (backoff 1, 2, 4, 8 s) under load
            fresh = client.send_command("dev.fresh", "after", timeout=2 * WAIT)
            refused = client.send_command("dev.third", timeout=WAIT)  # over the bound of 2
            error = refused.exception(0)
            assert isinstance(error, ConnectionLostError) and "queued" in error.message
            assert isinstance(stale.exception(WAIT), ClientTimeoutError)
            deadline = time.monotonic() + 1.5  # past its Message Expiry (1 s) too
            wait_until(lambda: time.monotonic() > deadline, what="the stale request's expiry")
            own.start()
            assert fresh.result(WAIT) == "after"
            assert up.wait(WAIT) and client.connected
            assert late.get(timeout=WAIT).lost  # never answered: given up after late_wait
            assert [r["method"] for r in node.seen] == ["dev.a", "dev.fresh"]
        finally:
            if client is not None:
                client.close()
            node.close()


# -- a real node -------------------------------------------------------------------------------
@pytest.fixture
def node(broker: Any) -> Iterator[tuple[CommandServer, str]]:
    """A real node (CommandServer without TCP + MqttNode) with ``echo`` and ``fail``."""
    name = unique("pi")
    server = CommandServer(port=None, grace=0.5)
    server.add_command("echo", lambda value=None: value)

    def fail() -> None:
        raise ValueError("broken")

    server.add_command("fail", fail)
    server.add_transport(MqttNode(server, broker.url, name))
    with server:
        yield server, f"{broker.url}/{name}"


def test_a_real_node_answers_and_is_offline_once_stopped(node, clients):
    server, url = node
    client = clients(url)
    assert client.server_info["protocol"] == "1.0"
    assert client.call("echo", {"value": [1, "x"]}) == [1, "x"]
    future = client.send_command("fail")
    assert future.exception(WAIT).kind == "device_fault"
    described = client.call("rpc.discover")
    assert {m["name"] for m in described["methods"]} >= {"echo", "fail"}
    server.stop()
    wait_until(lambda: not client.connected, what="the node's clean stop")
    error = client.send_command("echo").exception(0)
    assert isinstance(error, NodeOfflineError) and error.data["reason"] == "stopped"


def test_statelink_call_over_mqtt(node, broker):
    _server, url = node
    done = statelink("call", "--server", url, "echo", '{"value": 42}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 42
    done = statelink("call", "-s", url, "nope", "--timeout", "5")
    assert done.returncode == 1 and "Method not found" in done.stderr
    ghost = f"{broker.url}/{unique('ghost')}"
    done = statelink("call", "--server", ghost, "echo")
    assert done.returncode == 3 and "never seen" in done.stderr, done.stderr
    done = statelink("call", "--server", f"mqtt://127.0.0.1:{free_port()}/n1", "echo")
    assert done.returncode == 3 and "broker" in done.stderr, done.stderr
    done = statelink("call", "--server", "mqtt://127.0.0.1/", "echo")
    assert done.returncode == 2 and "no node" in done.stderr


def test_statelink_check_against_the_retained_discover_document(node, broker, tmp_path: Path):
    server, url = node
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(
        "name: wf\nservers: {pi: 'mqtt://127.0.0.1/pi'}\ncommand_timeout: 5s\ninitial: a\n"
        "states:\n"
        "  a: {command: echo, params: {value: 1}, next: b}\n"
        "  b: {command: nothere, next: done}\n"
        "  done: {final: success}\n"
    )
    server.stop()  # the retained document is there while the node is offline
    done = statelink("check", str(workflow), "--server", f"pi={url}")
    assert done.returncode == 2 and "nothere" in done.stderr, done.stderr + done.stdout
    assert "echo, fail" in done.stderr  # the node's commands, from its discover document
    assert "state 'b'" in done.stderr and "state 'a'" not in done.stderr
    ghost = f"{broker.url}/{unique('ghost')}"
    done = statelink("check", str(workflow), "--server", ghost)
    assert done.returncode == 2 and "no discover document for node" in done.stderr
