"""The device side of a fleet: a server's core answering requests that come through an MQTT 5
broker (docs/fleet.md). The node connects *out* to the broker; nothing listens on the device.

:class:`MqttNode` is a :class:`~controller.server.lifecycle.Transport` of a
:class:`~controller.server.CommandServer`: started and stopped with it. What it does:

- subscribes ``P/N/rpc`` (QoS 1, at every connect) in a persistent session (Clean Start off,
  Session Expiry :data:`SESSION_EXPIRY`): requests published while the node was away are
  delivered when it comes back, unless their Message Expiry passed (the broker drops those:
  they never run);
- runs its paho client on the core's loop (:class:`~.loop_driver.LoopDriver`): each request
  message read from the broker becomes at once one :class:`~controller.server.Session`
  (:class:`_Request`), and is acknowledged once it is taken; the reply (one JSON text, or
  one array for a batch) goes to the message's Response Topic, QoS 1, with its Correlation
  Data; ``rpc.progress`` (asked for with the User Property ``progress=1``) goes the same way,
  QoS 0;
- the requests of one Response Topic (one controller connection) share one ``calls`` dict
  (``rpc.cancel``, duplicate ids) and one in-flight bound (``limits.max_inflight``, busy
  beyond); a second copy of a request still in flight (same Response Topic and Correlation
  Data: a QoS 1 redelivery) is dropped; idempotency keys cover the rest;
- publishes, retained at QoS 1: ``P/N/status`` (online at every connect; its Will says
  ``"lost"``; a clean stop says ``"stopped"`` before it disconnects), ``P/N/discover`` and
  ``P/N/state/DEVICE`` (at every connect, and each ``device.state`` change); any other
  notification of the core goes to ``P/N/event/METHOD`` (QoS 0).

MQTT requests are served as authenticated: the broker authenticates (users, TLS, ACLs), the
TCP shared secret does not apply. Threads: everything runs on the core's loop but the blocking
part of a (re)connect; no queue between the network and the core (the socket is read as fast
as the loop takes requests: the broker holds the rest, within its own bounds).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from statemachines import errorkinds as ek
from statemachines.addresses import BrokerUrl, check_node_name, parse_broker

from ..protocol import Decoder, Event, Invalid, Notification, Request, encode
from ..server.calls import Call
from ..server.core import PROTOCOL_VERSION
from ..server.lifecycle import CommandServer
from ..server.session import BatchReply, Session
from .connection import BrokerError, new_client
from .loop_driver import LoopDriver
from .options import MqttOptions
from .packing import PackedProperties, packed
from .topics import Topics

log = logging.getLogger("statelink.mqtt")

#: seconds the broker keeps the node's session (its subscription, the requests queued for it)
#: while the node is away
SESSION_EXPIRY = 3600
_PROGRESS = ("progress", "1")
_WITH_WILL = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _now() -> str:
    """ISO-8601 UTC, seconds (``2024-05-01T12:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("statelink")
    except PackageNotFoundError:
        return "unknown"


class MqttNode:
    """Serve ``server`` as node ``node`` through the broker ``broker`` (``mqtt://HOST[:PORT]`` or
    ``mqtts://``), with ``options`` (login, TLS CA, topic prefix; default: anonymous,
    ``statelink``). Made before the server starts, it starts and stops with the server
    (:meth:`CommandServer.add_transport`); made while it runs, it starts at once (and raises
    what :meth:`start` raises). Several nodes (different names) may serve one server.

    :meth:`start` raises :class:`~controller.mqtt.connection.BrokerError` when the broker cannot
    be reached, refuses the login, or refuses the subscription to ``P/N/rpc`` (ACL).
    """

    def __init__(
        self,
        server: CommandServer,
        broker: BrokerUrl | str,
        node: str,
        options: MqttOptions | None = None,
    ) -> None:
        self.server = server
        self.broker = parse_broker(broker)
        self.node = check_node_name(node)
        self.options = options or MqttOptions()
        self.topics = topics = Topics(self.options.topic_prefix)
        #: stable, so that the broker keeps one session per node across restarts
        self.client_id = f"statelink-node-{topics.prefix.replace('/', '-')}-{node}"
        self.rpc_topic = topics.rpc(node)
        self.status_topic = topics.status(node)
        self.client: mqtt.Client | None = None  #: while started
        self.dropped = 0  #: second copies of requests in flight, dropped (loop thread)
        self._driver: LoopDriver | None = None
        self._closing = True  #: take no more requests (not started, or stopping); loop thread
        self._controllers: dict[str | None, _Controller] = {}  #: loop thread
        self._announcer = _Announcer(self)
        self._decoder = Decoder()
        self._announced: list[mqtt.MQTTMessageInfo] = []  #: the first connect's publishes
        self._subscribed = threading.Event()  #: the first connect's SUBACK came
        self._refused: str | None = None  #: why the broker refused the subscription
        server.add_transport(self)

    def __repr__(self) -> str:
        return f"MqttNode({self.node!r} on {self.broker}, prefix {self.topics.prefix!r})"

    # -- lifetime (with the server's; not on its loop thread) ---------------------------------
    def start(self) -> None:
        """Connect, subscribe and announce; return once the broker has the retained status,
        discover and state documents (bounded by ``options.connect_timeout`` per step).
        Called by the server, once its loop runs."""
        limits = self.server.limits
        self._decoder = Decoder(limits.max_frame, limits.max_depth, limits.max_batch)
        self._controllers = {}
        self._announced = []
        self._subscribed.clear()
        self._refused = None
        will = {"online": False, "node": self.node, "reason": "lost"}
        client = new_client(
            self.client_id, self.broker, self.options, will=(self.status_topic, _json(will))
        )
        client.manual_ack_set(True)  # a message is acknowledged once the node has taken it
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        driver = LoopDriver(
            client,
            self.server.loop,
            self.broker,
            self.options,
            self._on_connect,
            session_expiry=SESSION_EXPIRY,
            name=f"node {self.node}",
        )
        self.client, self._driver = client, driver
        self._closing = False
        timeout = self.options.connect_timeout
        try:
            driver.connect()  # on_connect (subscribe, announce) has run on the loop
            if not self._subscribed.wait(timeout):
                raise BrokerError(
                    f"the MQTT broker {self.broker} did not confirm the node's subscription "
                    f"within {timeout:g} s"
                )
            for info in self._announced:  # the SUBACK came first (the broker keeps order)
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError) as exc:  # the connection dropped meanwhile
                    raise BrokerError(
                        f"the node could not publish its status to {self.broker}: {exc}"
                    ) from exc
                if not info.is_published():
                    raise BrokerError(
                        f"the MQTT broker {self.broker} did not acknowledge the node's status "
                        f"within {timeout:g} s"
                    )
            if self._refused is not None:
                raise BrokerError(self._refused)
        except BaseException:
            self._closing = True
            self.client = self._driver = None
            # with the Will: a status "online" already published must not stay
            driver.close(_WITH_WILL)
            raise

    def stop(self) -> None:
        """Stop taking requests (those the broker sends from now on are not acknowledged:
        they stay in the session, for the next start), publish the ``"stopped"`` status and
        wait for its PUBACK (bounded), disconnect cleanly (no Will). Called by the server once
        every call was answered, while its loop still runs."""
        driver, client = self._driver, self.client
        if driver is None or client is None:
            return
        timeout = self.options.connect_timeout

        def last_words() -> mqtt.MQTTMessageInfo:
            self._closing = True
            self.server.sessions.discard(self._announcer)
            stopped = {"online": False, "node": self.node, "reason": "stopped", "at": _now()}
            return client.publish(self.status_topic, _json(stopped), qos=1, retain=True)

        try:
            driver.call(last_words, timeout).wait_for_publish(timeout)
        except Exception as exc:  # the loop is stuck, not connected, or the queue is full
            log.warning(
                "node %s: could not publish its stopped status (%s); the broker publishes "
                "its Will instead",
                self.node,
                exc or type(exc).__name__,
            )
        self.client = self._driver = None
        driver.close()
        log.info("node %s: disconnected from %s", self.node, self.broker)

    # -- the core's loop ----------------------------------------------------------------------
    def _on_connect(self, _session_present: bool) -> None:
        client = self.client
        if client is None or self._closing:
            return
        # Even when the broker kept the session: a subscription it refused before (an ACL
        # fixed since) must not leave the node deaf for the session's lifetime.
        client.subscribe(self.rpc_topic, qos=1)
        if self._announced:
            log.info("node %s: connected to %s again", self.node, self.broker)
        # After the SUBSCRIBE: once a controller sees the status, its requests reach the node.
        self._announce()

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        failed = [reason for reason in reasons if reason.is_failure]
        if failed:
            self._refused = (
                f"the MQTT broker {self.broker} refused the subscription to {self.rpc_topic}: "
                f"{failed[0]} (check the broker's ACL for this user)"
            )
            log.error("node %s: %s", self.node, self._refused)
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._closing:
            return  # not acknowledged: the broker keeps it for the next start
        try:
            if message.retain or message.topic != self.rpc_topic:
                # A retained request would run again at every subscribe: never run one.
                log.warning(
                    "node %s: ignored a %s message on %s",
                    self.node,
                    "retained" if message.retain else "stray",
                    message.topic,
                )
            else:
                props = message.properties
                self._handle(
                    message.payload,  # type: ignore[arg-type]  # bytes, as paho reads it
                    getattr(props, "ResponseTopic", None),
                    getattr(props, "CorrelationData", None),
                    _PROGRESS in getattr(props, "UserProperty", ()),
                )
        except Exception:
            log.exception("node %s: handling a request failed", self.node)
        client.ack(message.mid, message.qos)

    def _handle(
        self, payload: bytes, topic: str | None, correlation: bytes | None, progress: bool
    ) -> None:
        """One request message: a :class:`_Request` session fed with its decoded message."""
        controller = self._controllers.get(topic)
        if controller is None:
            controller = self._controllers[topic] = _Controller(topic)
            self.server.sessions.add(controller)
        elif correlation is not None and correlation in controller.requests:
            self.dropped += 1
            log.debug("node %s: dropped a second copy of a request in flight", self.node)
            return
        session = _Request(self, controller, correlation)
        if correlation is not None:
            controller.requests[correlation] = session
        controller.open += 1
        if progress:
            session.subscriptions.add("rpc.progress")
        session.feed(self._decode(payload))
        session.fed = True
        if not session.pending:
            self.finished(session)

    def _decode(self, payload: bytes) -> Event:
        if payload.endswith(b"\n"):  # the one optional newline of a line-oriented peer
            payload = payload[:-1]
        limit = self._decoder.max_frame
        if len(payload) > limit:
            return Invalid(
                ek.INVALID_REQUEST,
                f"Invalid Request: message longer than the frame limit of {limit} bytes",
                data={"max_frame": limit},
            )
        event = self._decoder.decode_line(payload)
        if event is None:
            return Invalid(ek.INVALID_REQUEST, "Invalid Request", data={"reason": "empty message"})
        return event

    def finished(self, session: _Request) -> None:
        """``session``'s message is fully answered: forget it (and its controller, if idle)."""
        controller, correlation = session.controller, session.correlation
        if correlation is not None and controller.requests.get(correlation) is session:
            del controller.requests[correlation]
        controller.open -= 1
        if not controller.open and self._controllers.get(controller.topic) is controller:
            del self._controllers[controller.topic]
            self.server.sessions.discard(controller)

    def _announce(self) -> None:
        """Status, discover and every device's state, retained (each connect)."""
        client = self.client
        if client is None or self._closing:
            return
        server = self.server
        server.sessions.add(self._announcer)
        status = {
            "online": True,
            "node": self.node,
            "since": _now(),
            "version": _version(),
            "protocol": PROTOCOL_VERSION,
            "devices": list(server.devices),
            "max_inflight": server.limits.max_inflight,
        }
        topics = self.topics
        infos = [
            client.publish(self.status_topic, _json(status), qos=1, retain=True),
            client.publish(
                topics.discover(self.node), _json(server.discover()), qos=1, retain=True
            ),
        ]
        for name, plugin in server.devices.items():
            state = getattr(plugin, "state", None)
            if isinstance(state, str):
                params = {"device": name, "state": state, "previous": state, "command": None}
                reason = getattr(plugin, "reason", None)
                if reason is not None:
                    params["reason"] = reason
                infos.append(client.publish(topics.state(self.node, name), _json(params), 1, True))
        if not self._announced:
            self._announced = infos

    def notification(self, method: str, params: Any) -> None:
        """A notification of the core (``device.state`` and any other but ``rpc.progress``)."""
        try:
            payload = _json(params)
        except (TypeError, ValueError) as exc:
            log.error("node %s: %s params are not JSON (%s); not published", self.node, method, exc)
            return
        if method == "device.state" and isinstance(params, dict) and "device" in params:
            self._publish(
                self.topics.state(self.node, str(params["device"])), payload, 1, None, True
            )
        elif method and not any(char in method for char in "/+#"):
            self._publish(self.topics.event(self.node, method), payload, 0, None)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: PackedProperties | None,
        retain: bool = False,
    ) -> None:
        client = self.client
        if client is None:
            return
        try:
            info = client.publish(topic, payload, qos, retain, properties)
        except ValueError as exc:  # e.g. a Response Topic with a wildcard
            log.warning("node %s: cannot publish on %r: %s", self.node, topic, exc)
            return
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.warning(
                "node %s: the queue to the broker is full; a message to %s was dropped",
                self.node,
                topic,
            )


def _json(value: Any) -> bytes:
    return _dumps(value).encode()


class _Controller:
    """The requests in flight of one Response Topic (one controller connection): a peer of the
    core (``core.sessions``) while it has any, so a stop answers each call once."""

    __slots__ = ("calls", "inflight", "open", "requests", "subscriptions", "topic")

    def __init__(self, topic: str | None) -> None:
        self.topic = topic
        self.calls: dict[Any, Call] = {}  #: shared by its sessions (rpc.cancel, duplicate ids)
        self.inflight = 0  #: requests in flight (the bound of limits.max_inflight)
        self.open = 0  #: sessions whose message is not fully answered
        self.requests: dict[bytes, _Request] = {}  #: by Correlation Data: copies are dropped
        self.subscriptions: set[str] = set()  #: none: notifications go to topics (_Announcer)

    def notify(self, method: str, params: Any) -> None:
        pass


class _Every(set[str]):
    """Every notification method but ``rpc.progress`` (which goes to its requester only)."""

    def __contains__(self, method: object) -> bool:
        return method != "rpc.progress"


class _Announcer:
    """The node's peer for the core's notifications: publishes them on the node's topics."""

    __slots__ = ("calls", "node", "subscriptions")

    def __init__(self, node: MqttNode) -> None:
        self.node = node
        self.calls: dict[Any, Call] = {}
        self.subscriptions: set[str] = _Every()

    def notify(self, method: str, params: Any) -> None:
        self.node.notification(method, params)


class _Request(Session):
    """One request message (a request, a notification or a batch) as a session of the core.

    Replies go to the message's Response Topic with its Correlation Data. The session shares
    its controller's ``calls`` and in-flight count; it is done once every call it started is
    answered (``pending`` 0 after :meth:`feed`)."""

    __slots__ = ("controller", "correlation", "fed", "node", "pending", "properties")

    def __init__(self, node: MqttNode, controller: _Controller, correlation: bytes | None):
        super().__init__(node.server, self._send, f"mqtt:{controller.topic or '-'}")
        node.server.sessions.discard(self)  # its controller stands for it there
        self.node = node
        self.controller = controller
        self.correlation = correlation
        self.calls = controller.calls
        self.authenticated = True  # the broker authenticated the sender
        self.pending = 0  #: calls started and not yet answered
        self.fed = False
        self.properties: PackedProperties | None = None

    def start_call(self, msg: Request | Notification, batch: BatchReply | None) -> None:
        controller = self.controller
        # The bound is per controller: the session counts from its controller's figure.
        self.inflight = controller.inflight
        controller.inflight += 1
        self.pending += 1
        super().start_call(msg, batch)

    def forget(self, call: Call) -> None:
        super().forget(call)
        self.controller.inflight -= 1
        self.pending -= 1
        if not self.pending and self.fed:
            self.node.finished(self)

    def _send(self, data: bytes) -> None:
        self._publish(data, 1)

    def notify(self, method: str, params: Any) -> None:
        """Only ``rpc.progress`` comes here (asked for with the User Property progress=1)."""
        if method not in self.subscriptions or (self.fed and not self.pending):
            return
        self.stats.notifications_total += 1
        self.notified += 1
        self._publish(encode(Notification(method, params)), 0)

    def _publish(self, data: bytes, qos: int) -> None:
        topic = self.controller.topic
        if topic is None:
            log.debug("node %s: a request without Response Topic: reply dropped", self.node.node)
            return
        if self.properties is None:
            self.properties = packed(correlation=self.correlation)
        self.node._publish(topic, data[:-1] if data.endswith(b"\n") else data, qos, self.properties)


__all__ = ["SESSION_EXPIRY", "MqttNode"]
