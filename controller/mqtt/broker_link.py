"""One controller's connection to a broker, shared by every
:class:`~controller.mqtt.client.MqttClient` that talks to a node behind it (docs/fleet.md).

- **Replies**: the link owns one reply topic ``P/_reply/<random hex>`` (the Response Topic of
  every request it carries) and routes each message there by its Correlation Data, one dict
  lookup on the paho thread (:attr:`BrokerLink.routes`), to the client that sent the request.
  Correlation Data is random per request, so a node can only answer the requests it got.
- **Node status**: :meth:`BrokerLink.attach` subscribes ``P/N/status`` of the client's node and
  then runs a *barrier* (a message published to the link's own reply topic and awaited):
  the broker sends retained messages right after the SUBACK, before anything published later,
  so once the barrier is back the node's status is known, or the node was never seen. Status
  changes are handed to the node's clients on the paho thread (an offline node fails their
  requests at once).
- **Notifications**: ``P/N/state/DEVICE`` and ``P/N/event/METHOD`` subscriptions, counted per
  topic filter, delivered to the node's clients.
- **Broker loss**: paho reconnects with backoff (1..30 s). The session (Session Expiry
  :data:`SESSION_EXPIRY`, clean start on the first connect only) keeps the subscriptions and
  queues the replies of requests in flight while the link is away; every reconnect subscribes
  again all the same (retained statuses come again: a node that changed meanwhile is seen).
  Requests published while the broker is away wait in paho's bounded queue; one whose
  deadline passed meanwhile is dropped from it at the reconnect (:func:`_drop_stale`), so a
  stale command never goes out late.

Threads: paho's network thread runs every callback; ``attach``/``subscribe``/``retained`` block
(bounded by ``options.connect_timeout``) and are never called on the paho thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from statemachines.addresses import BrokerUrl, NodeAddress, parse_broker

from .connection import RECEIVE_MAXIMUM, BrokerError, new_client, start
from .options import MqttOptions
from .packing import PackedProperties, packed
from .topics import DISCOVER, EVENT, STATE, STATUS, Topics

log = logging.getLogger("statelink.mqtt")

#: seconds the broker keeps a controller's session (subscriptions, queued replies) while the
#: link is away; a closed link ends its session at once
SESSION_EXPIRY = 300

_PROGRESS = [("progress", "1")]
_QOS1 = SubscribeOptions(qos=1)
_OK = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  #: sent, or queued until reconnected


class NodeClient(Protocol):
    """What the link needs of a client of a node (:class:`~controller.mqtt.client.
    MqttClient`); every method is called on the paho thread and must not block."""

    @property
    def address(self) -> NodeAddress: ...

    def link_reply(self, request_id: Any, payload: bytes) -> None:
        """A message on the reply topic with the Correlation Data of this request."""

    def link_status(self, status: dict[str, Any] | None) -> None:
        """The node's status message (None: cleared)."""

    def link_up(self, up: bool) -> None:
        """The broker connection went down (False) or came back (True)."""

    def link_notification(self, method: str, params: Any) -> None:
        """A notification of the node (``device.state``, ``P/N/event/METHOD``)."""


class _Node:
    """What the link knows of one node: its last status (None: never seen), whether that is
    known yet (``ready``: the barrier after subscribing passed), its clients."""

    __slots__ = ("clients", "ready", "status")

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.clients: list[NodeClient] = []


class BrokerLink:
    """A controller's connection to ``broker`` (see the module docstring); thread-safe.

    ``start()`` connects (raises :class:`~controller.mqtt.connection.BrokerError`); clients
    attach and detach; ``close()`` ends the session and stops the network thread.
    """

    def __init__(
        self,
        broker: BrokerUrl | str,
        options: MqttOptions | None = None,
        *,
        session_expiry: int = SESSION_EXPIRY,
    ) -> None:
        self.broker = parse_broker(broker)
        self.options = options or MqttOptions()
        self.topics = Topics(self.options.topic_prefix)
        self.controller = secrets.token_hex(8)
        #: the Response Topic of every request this link carries
        self.reply_topic = self.topics.reply(self.controller)
        self.session_expiry = session_expiry
        #: request ids, unique per reply topic (a node detects duplicates per Response Topic)
        self.ids = itertools.count(1)
        #: correlation data -> (client, request id): requests whose reply may still come
        self.routes: dict[bytes, tuple[NodeClient, Any]] = {}
        self._barriers: dict[bytes, threading.Event] = {}
        self._captures: dict[str, list[bytes]] = {}  #: topic -> retained payloads seen
        self._nodes: dict[str, _Node] = {}
        self._topic_count: dict[str, int] = {}  #: subscribed topic filters (and users)
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._up = False  #: the first connect succeeded (start() returns at once)
        self._connected = threading.Event()
        self._connected_once = False
        self._closed = False
        self.reconnects = 0

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def started(self) -> bool:
        return self._up

    def start(self) -> BrokerLink:
        """Connect (once; later calls return at once). Raises ``BrokerError`` (an OSError)
        when the broker cannot be reached or refuses, RuntimeError once closed."""
        if self._up:
            return self
        with self._start_lock:
            if self._closed:
                raise RuntimeError("the broker link is closed")
            if self._up:
                return self
            client = new_client(f"statelink-ctl-{self.controller}", self.broker, self.options)
            client.on_message = self._on_message
            client.on_disconnect = self._on_disconnect
            self._client = client  # before the connect: on_connect subscribes through it
            try:
                start(
                    client,
                    self.broker,
                    self.options,
                    self._on_connect,
                    clean_start=True,
                    session_expiry=self.session_expiry,
                    receive_maximum=RECEIVE_MAXIMUM,
                )
            except BaseException:
                self._client = None
                raise
            self._up = True
        return self

    def close(self) -> None:
        """End the session (Session Expiry 0 on DISCONNECT: the broker forgets it at once) and
        stop the network thread. Clients still attached see the link down."""
        with self._start_lock:
            self._closed = True
            client, self._client = self._client, None
            up, self._up = self._up, False
        if client is None or not up:
            return
        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        client.disconnect(properties=properties)
        client.loop_stop()  # the network thread ends within its 1 s select timeout
        self._connected.clear()

    def __enter__(self) -> BrokerLink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _on_connect(self, session_present: bool) -> None:
        """paho thread, every (re)connect, before paho resends what it queued."""
        client = self._client
        if client is None:
            return
        _drop_stale(client)
        with self._lock:
            topics = [self.reply_topic, *self._topic_count]
        client.subscribe([(topic, _QOS1) for topic in topics])
        again, self._connected_once = self._connected_once, True
        self._connected.set()
        if again:
            self.reconnects += 1
            log.info("reconnected to the MQTT broker %s", self.broker)
            self._each_client(lambda c: c.link_up(True))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, *_args: Any) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        if not self._closed:
            log.warning("lost the MQTT broker %s; reconnecting", self.broker)
            self._each_client(lambda c: c.link_up(False))

    def _each_client(self, fn: Callable[[NodeClient], None]) -> None:
        with self._lock:
            clients = [c for node in self._nodes.values() for c in node.clients]
        for client in clients:
            try:
                fn(client)
            except Exception:
                log.exception("broker link event for %s failed", client.address)

    # -- requests ---------------------------------------------------------------------------
    def publish_request(
        self, topic: str, data: bytes, correlation: bytes, timeout: float, progress: bool
    ) -> bool:
        """Publish one request (QoS 1, Response Topic = the reply topic, Correlation Data,
        Message Expiry = ceil(timeout)); False when paho's queue is full or the link closed."""
        client = self._client
        if client is None:
            return False
        properties = _request_properties(
            time.monotonic() + timeout, timeout, self.reply_topic, correlation, progress
        )
        return client.publish(topic, data, 1, False, properties).rc in _OK

    def publish(self, topic: str, data: bytes) -> bool:
        """Publish a message without reply (QoS 1); False when it cannot be queued."""
        client = self._client
        return client is not None and client.publish(topic, data, 1).rc in _OK

    # -- nodes ------------------------------------------------------------------------------
    def attach(self, client: NodeClient) -> None:
        """Follow ``client``'s node: subscribe its status (first client of the node) and wait
        until it is known (the barrier). Raises ``BrokerError`` when the broker does not
        answer within ``options.connect_timeout``."""
        self.start()
        name = client.address.node
        with self._lock:
            node = self._nodes.get(name)
            first = node is None
            if node is None:
                node = self._nodes[name] = _Node()
                self._topic_count[self.topics.status(name)] = 1
            node.clients.append(client)
        try:
            if first:
                self._subscribe_now(self.topics.status(name))
                self.barrier()
                node.ready.set()
            elif not node.ready.wait(self.options.connect_timeout):
                raise BrokerError(f"the status of node {name} is not known yet; try again")
        except BaseException:
            self.detach(client)
            raise

    def detach(self, client: NodeClient) -> None:
        """Stop following ``client``'s node for it (the last client of a node unsubscribes
        its status)."""
        name = client.address.node
        with self._lock:
            node = self._nodes.get(name)
            if node is None or client not in node.clients:
                return
            node.clients.remove(client)
            if node.clients:
                return
            del self._nodes[name]
        self.unsubscribe(self.topics.status(name))

    def status(self, node: str) -> dict[str, Any] | None:
        """The node's last status message (None: never seen, or not followed)."""
        entry = self._nodes.get(node)
        return None if entry is None else entry.status

    # -- subscriptions ----------------------------------------------------------------------
    def subscribe(self, topic: str) -> None:
        """Subscribe ``topic`` (counted: one broker subscription per filter) and return once
        the broker has it (a barrier; ``BrokerError`` after ``options.connect_timeout``)."""
        with self._lock:
            count = self._topic_count.get(topic, 0)
            self._topic_count[topic] = count + 1
        if count == 0:
            self._subscribe_now(topic)
        self.barrier()

    def unsubscribe(self, topic: str) -> None:
        """Undo one :meth:`subscribe` (never blocks)."""
        with self._lock:
            count = self._topic_count.get(topic, 0) - 1
            if count > 0:
                self._topic_count[topic] = count
                return
            self._topic_count.pop(topic, None)
        client = self._client
        if client is not None and count == 0:
            client.unsubscribe(topic)

    def _subscribe_now(self, topic: str) -> None:
        client = self._client
        if client is None:
            raise BrokerError(f"not connected to the MQTT broker {self.broker}")
        client.subscribe(topic, options=_QOS1)  # not connected: the reconnect subscribes it

    def barrier(self, timeout: float | None = None) -> None:
        """Return once everything the broker had queued for this link before now has been
        handled (a round trip through the broker). ``BrokerError`` after ``timeout``
        (default ``options.connect_timeout``)."""
        client = self._client
        if client is None:
            raise BrokerError(f"not connected to the MQTT broker {self.broker}")
        token = b"\x00barrier" + os.urandom(8)
        done = threading.Event()
        self._barriers[token] = done
        try:
            client.publish(self.reply_topic, b"", 1, False, packed(correlation=token))
            wait = self.options.connect_timeout if timeout is None else timeout
            if not done.wait(wait):
                raise BrokerError(f"the MQTT broker {self.broker} did not answer within {wait:g} s")
        finally:
            self._barriers.pop(token, None)

    def retained(self, topic: str, timeout: float | None = None) -> bytes | None:
        """The retained message of ``topic`` (None: none), read with a subscription and a
        barrier. ``BrokerError`` as :meth:`barrier`."""
        box: list[bytes] = []
        with self._lock:
            self._captures[topic] = box
        with self._lock:
            self._topic_count[topic] = self._topic_count.get(topic, 0) + 1
        try:
            try:  # subscribe even if subscribed: the broker sends the retained message again
                self._subscribe_now(topic)
                self.barrier(timeout)
            finally:
                self.unsubscribe(topic)
        finally:
            with self._lock:
                self._captures.pop(topic, None)
        return box[-1] if box else None

    # -- the paho thread --------------------------------------------------------------------
    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        payload = bytes(msg.payload)  # paho's is bytes already (bytes() of bytes is itself)
        if topic == self.reply_topic:
            correlation = getattr(msg.properties, "CorrelationData", None)
            route = self.routes.get(correlation)  # type: ignore[arg-type]
            if route is not None:
                route[0].link_reply(route[1], payload)
                return
            done = self._barriers.pop(correlation, None)  # type: ignore[arg-type]
            if done is not None:
                done.set()
            else:
                log.debug("dropped a reply to no request of this controller")
            return
        if self._captures and msg.retain:
            box = self._captures.get(topic)
            if box is not None:
                box.append(payload)
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        name, kind, rest = parsed
        node = self._nodes.get(name)
        if node is None:
            return
        if kind == STATUS:
            self._on_status(name, node, payload)
        elif kind == STATE and not msg.retain:  # a retained one is the state at subscribe time
            self._notify(node, "device.state", payload)
        elif kind == EVENT and rest and not msg.retain:
            self._notify(node, rest, payload)
        elif kind != DISCOVER:
            log.debug("ignored a message on %s", topic)

    def _on_status(self, name: str, node: _Node, payload: bytes) -> None:
        status = parse_status(name, payload)
        node.status = status
        for client in list(node.clients):
            try:
                client.link_status(status)
            except Exception:
                log.exception("status of node %s: a client failed", name)

    def _notify(self, node: _Node, method: str, payload: bytes) -> None:
        try:
            params = json.loads(payload) if payload else None
        except ValueError:
            log.warning("dropped a %s notification that is not JSON", method)
            return
        for client in list(node.clients):
            client.link_notification(method, params)


def read_discover(
    address: NodeAddress, options: MqttOptions | None = None
) -> dict[str, Any] | None:
    """The node's retained ``rpc.discover`` document (``P/NODE/discover``; there while the
    node is offline), None when it has none. A short-lived link of its own (no session kept).
    Raises ``BrokerError`` (unreachable) and ValueError (not a JSON object)."""
    with BrokerLink(address.broker, options, session_expiry=0) as link:
        payload = link.retained(link.topics.discover(address.node))
    if payload is None:
        return None
    try:
        document = json.loads(payload)
    except ValueError as exc:
        raise ValueError(f"the discover document of node {address.node} is not JSON: {exc}")
    if not isinstance(document, dict):
        raise ValueError(f"the discover document of node {address.node} is not a JSON object")
    return document


def parse_status(node: str, payload: bytes) -> dict[str, Any] | None:
    """A status message as a dict with a boolean ``online`` (None for an empty payload: the
    retained status was cleared); a payload that is not a status object reads as offline,
    reason ``"bad status"``."""
    if not payload:
        return None
    try:
        status = json.loads(payload)
    except ValueError:
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("online"), bool):
        log.warning("node %s: its status is not a status object: %.80r", node, payload)
        return {"online": False, "node": node, "reason": "bad status"}
    return status


def _request_properties(
    deadline: float, timeout: float, reply_topic: str, correlation: bytes, progress: bool
) -> PackedProperties:
    """A request's PUBLISH properties (Message Expiry = ceil(timeout), at least 1 s), marked
    with its ``deadline`` (monotonic) for :func:`_drop_stale`."""
    properties = packed(
        expiry=max(1, math.ceil(timeout)),
        response_topic=reply_topic,
        correlation=correlation,
        user=_PROGRESS if progress else None,
    )
    object.__setattr__(properties, "deadline", (deadline, reply_topic, correlation, progress))
    return properties


def _drop_stale(client: mqtt.Client) -> None:
    """At a reconnect, before paho resends what it queued: drop the requests whose deadline
    passed while they waited (they would reach the broker with their full expiry and run
    late), and shorten the expiry of the others to what is left.

    paho keeps no publish time across a disconnect, so :func:`_request_properties` marks the
    deadline on the request's properties; this reads paho's outgoing queue
    (``_out_messages``), guarded: a paho without it skips this step."""
    messages = getattr(client, "_out_messages", None)
    lock = getattr(client, "_out_message_mutex", None)
    if messages is None or lock is None:
        return
    now = time.monotonic()
    with lock:
        for mid, message in list(messages.items()):
            mark = getattr(message.properties, "deadline", None)
            if mark is None or message.state not in _UNSENT:
                continue
            deadline, reply_topic, correlation, progress = mark
            if deadline <= now:
                del messages[mid]
                log.info("dropped a request queued while the broker was away: it expired")
            else:
                message.properties = _request_properties(
                    deadline, deadline - now, reply_topic, correlation, progress
                )


_UNSENT = (mqtt.mqtt_ms_publish, mqtt.mqtt_ms_queued)

__all__ = ["SESSION_EXPIRY", "BrokerLink", "NodeClient", "parse_status", "read_discover"]
