"""The client of one fleet node, through a broker: :class:`MqttClient`, the same API and
request semantics as the TCP :class:`~controller.client.Client` (see
:mod:`controller.client_base`), over a shared :class:`~controller.mqtt.broker_link.BrokerLink`.

>>> # with MqttClient("mqtt://127.0.0.1/pi-1") as client:
>>> #     client.call("door.open", timeout=30)

What is MQTT's (docs/fleet.md):

- A request is published QoS 1 on ``P/NODE/rpc`` with the link's reply topic as Response
  Topic, random Correlation Data, and Message Expiry = ceil(timeout), so that the broker never
  delivers it late; it is published from the caller's thread and its reply is settled on the
  paho thread.
- **Offline**: a node whose status is offline, or that was never seen, fails a command at once
  with :class:`~controller.errors.NodeOfflineError` (kind ``offline``; data ``{"node",
  "reason"}``); a node going offline (its Last Will, or a clean stop) fails its pending
  commands at once, and its timed-out ones get that error as their late outcome.
- **Keys**: every device command without a key gets one (``"mqtt-" + random hex``), so a QoS 1
  redelivery never runs it twice.
- **Broker loss**: pending requests stay pending (the session may still deliver their
  replies); their timeouts bound them. A late outcome is awaited :attr:`MqttClient.late_wait`
  seconds after the timeout at most (a request the broker expired is never answered).
- Notifications: ``device.state`` from ``P/NODE/state/+`` (changes only, not the retained
  state), ``rpc.progress`` of this client's requests (asked for with each request once
  subscribed), any other method from ``P/NODE/event/METHOD``.
- ``server_info`` is the node's status (``devices``, ``max_inflight``, ``version``, ...).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from statemachines.addresses import NodeAddress, ServerAddress, parse_server

from ..client_base import BaseClient, Handler, Pending
from ..client_reader import limits_of
from ..errors import ConnectionLostError, NodeOfflineError, ParseError, RpcError, error_for
from ..protocol import Decoder, ErrorResponse, Invalid, Notification, Response, encode
from ..scheduler import Scheduler
from .broker_link import BrokerLink
from .options import MqttOptions

log = logging.getLogger("statelink.mqtt")

#: seconds a timed-out request's late outcome is awaited (then ``on_late`` gets ``lost``)
LATE_WAIT = 60.0
#: bytes of random Correlation Data per request
CORRELATION_BYTES = 12


def node_address(address: ServerAddress | str) -> NodeAddress:
    """``mqtt://BROKER[:PORT]/NODE`` (or a :class:`NodeAddress`) -> :class:`NodeAddress`;
    ValueError for anything else."""
    parsed = parse_server(address)
    if not isinstance(parsed, NodeAddress):
        raise ValueError(
            f"{address!r} is not a fleet node address; expected mqtt://BROKER[:PORT]/NODE"
        )
    return parsed


class MqttClient(BaseClient):
    """A thread-safe client of one fleet node (see the module docstring).

    ``link``: the broker connection to share (its broker must be the address's); None: the
    client makes (and closes) its own from ``options``. ``connect=False``: call
    :meth:`connect` later. Connecting raises
    :class:`~controller.mqtt.connection.BrokerError` (an OSError) when the broker cannot be
    reached; a node that is offline is not an error until a command is sent to it.
    """

    late_wait = LATE_WAIT

    def __init__(
        self,
        address: NodeAddress | str,
        *,
        options: MqttOptions | None = None,
        link: BrokerLink | None = None,
        scheduler: Scheduler | None = None,
        connect: bool = True,
        name: str = "statelink-client",
    ) -> None:
        self.address = node_address(address)
        super().__init__(
            name=name, scheduler=scheduler, timers_name=f"statelink-mqtt-timers-{self.address.node}"
        )
        if link is None:
            link = BrokerLink(self.address.broker, options)
            self._own_link = True
        else:
            self._own_link = False
            if link.broker != self.address.broker:
                raise ValueError(
                    f"the broker link goes to {link.broker}, not to {self.address.broker}"
                )
        self.link = link
        self.node = self.address.node
        self._rpc_topic = link.topics.rpc(self.node)
        self._routes = link.routes
        self._ids = link.ids  # unique per reply topic: the node detects duplicates per topic
        self._decoder = Decoder()
        self._max_frame = limits_of({})[0]
        self._progress = False  #: ask for rpc.progress (someone subscribed to it)
        self._attached = False
        self._up = False  #: what on_connection handlers were last told
        #: method -> the link topic subscribed for it
        self._topics: dict[str, str] = {}
        if connect:
            self.connect()

    # -- connection -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """The broker is connected and the node online."""
        return self.link.connected and self._online(self.link.status(self.node))

    @staticmethod
    def _online(status: dict[str, Any] | None) -> bool:
        return status is not None and status.get("online") is True

    def connect(self) -> None:
        """Connect the link (if this client owns it, or nobody started it) and learn the
        node's status. Raises ``BrokerError`` (an OSError) when the broker cannot be reached."""
        if self._closed.is_set():
            raise ConnectionLostError("the client is closed")
        if self._attached:
            return
        self.link.attach(self)
        self._attached = True
        status = self.link.status(self.node)
        self._take_status(status)
        self._up = self._online(status) and self.link.connected

    def _take_status(self, status: dict[str, Any] | None) -> None:
        if self._online(status):
            assert status is not None
            self.server_info = dict(status)
            self._max_frame, depth = limits_of(status)
            self._decoder = Decoder(max_depth=depth)

    def link_status(self, status: dict[str, Any] | None) -> None:
        """paho thread: the node's status changed (or came again)."""
        self._take_status(status)
        if not self._online(status) and self._attached:
            reason = _reason(status)
            self._fail_all(
                lambda request_id, entry: self._offline_error(entry.method, reason),
                late_error=True,
            )
        self._tell_connection()

    def link_up(self, up: bool) -> None:
        """paho thread: the broker connection went down or came back."""
        if up:
            self.reconnects += 1
        self._tell_connection()

    def _tell_connection(self) -> None:
        up = self.connected
        if up != self._up:
            self._up = up
            self._emit_connection(up)

    def _offline_error(self, method: str, reason: str) -> NodeOfflineError:
        if reason == "never seen":
            text = (
                f"node {self.node} was never seen on {self.link.broker} (prefix "
                f"{self.link.topics.prefix}): is `statelink serve --broker ... --node "
                f"{self.node}` running?"
            )
        else:
            text = f"node {self.node} is offline ({reason})"
        return NodeOfflineError(text, {"node": self.node, "reason": reason, "method": method})

    def _where(self) -> str:
        return str(self.address)

    def link_notification(self, method: str, params: Any) -> None:
        """paho thread: a notification of the node."""
        self._notify_subscribers(method, params)

    # -- calls ------------------------------------------------------------------------------
    def _default_key(self, method: str) -> str | None:
        """A device command sent without a key gets one (``"mqtt-" + random hex``), so that a
        QoS 1 redelivery never runs it twice; ``rpc.*`` methods get none."""
        return None if method.startswith("rpc.") else "mqtt-" + secrets.token_hex(12)

    def _new_tag(self, request_id: Any) -> bytes:
        correlation = os.urandom(CORRELATION_BYTES)
        self._routes[correlation] = (self, request_id)
        return correlation

    def _release(self, entry: Pending) -> None:
        self._routes.pop(entry.tag, None)

    def _transmit(
        self, request_id: Any, entry: Pending, data: bytes, timeout: float
    ) -> RpcError | None:
        status = self.link.status(self.node)
        if not self._online(status):
            return self._offline_error(entry.method, _reason(status))
        if self.link.publish_request(self._rpc_topic, data, entry.tag, timeout, self._progress):
            return None
        return ConnectionLostError(
            f"cannot send {entry.method} to node {self.node}: too many requests queued while "
            f"the MQTT broker {self.link.broker} is away"
            if not self._closed.is_set()
            else "the client is closed",
            {"method": entry.method},
        )

    def link_reply(self, request_id: Any, payload: bytes) -> None:
        """paho thread: a message on the reply topic with this request's Correlation Data."""
        if len(payload) > self._max_frame:
            self._settle_undecodable(
                request_id,
                f"the reply is {len(payload)} bytes, over the frame limit of "
                f"{self._max_frame} bytes",
            )
            return
        event = self._decoder.decode_line(payload)
        if isinstance(event, Response):
            if event.id == request_id:
                self._settle(request_id, event.result, None, event.replayed)
            else:
                self._settle_undecodable(request_id, f"the reply names another id ({event.id!r})")
        elif isinstance(event, ErrorResponse):
            self._settle(request_id, *_error_of(event))
        elif isinstance(event, Notification):
            self._notify_subscribers(event.method, event.params)
        elif isinstance(event, Invalid):
            reason = event.message
            if isinstance(event.data, dict) and "reason" in event.data:
                reason = f"{reason}: {event.data['reason']}"
            self._settle_undecodable(request_id, reason)
        elif event is None:
            self._settle_undecodable(request_id, "the reply is empty")
        else:  # a batch: a client never sends one
            self.handle_event(event)

    def _settle_undecodable(self, request_id: Any, reason: str) -> None:
        with self._lock:
            entry = self._pending.get(request_id) or self._late.get(request_id)
        method = entry.method if entry is not None else "a request"
        self._settle(
            request_id,
            None,
            ParseError(
                f"the reply to {method} (id {request_id!r}) from node {self.node} cannot be "
                f"decoded: {reason}",
                {"reason": reason, "source": "client"},
            ),
        )

    def notify(self, method: str, params: Any = None) -> bool:
        """Send a notification to the node (QoS 1, no reply); False when it cannot go out."""
        return self.link.publish(self._rpc_topic, encode(Notification(method, params)))

    def subscribe(self, method: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(params)`` for each notification ``method`` of the node (on the paho
        thread). ``device.state``: changes only; ``rpc.progress``: of this client's requests
        sent from now on. Blocks until the broker has the subscription (``BrokerError``
        after ``options.connect_timeout``). Returns an unsubscribe (never blocks)."""
        if self._add_handler(method, handler):
            if method == "rpc.progress":
                self._progress = True
            else:
                topic = self._topic_of(method)
                try:
                    self.link.subscribe(topic)
                except BaseException:
                    self._subscribers.pop(method, None)
                    raise
                self._topics[method] = topic

        def unsubscribe() -> None:
            if self._remove_handler(method, handler):
                if method == "rpc.progress":
                    self._progress = False
                topic = self._topics.pop(method, None)
                if topic is not None:
                    self.link.unsubscribe(topic)

        return unsubscribe

    def _topic_of(self, method: str) -> str:
        topics = self.link.topics
        if method == "device.state":
            return topics.state(self.node)
        if not method or any(c in method for c in "/+#"):
            raise ValueError(f"cannot subscribe to {method!r} over MQTT")
        return topics.event(self.node, method)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the link (closing it if it is this client's own); every pending request
        resolves with connection-lost, late ones are given up."""
        self._closed.set()
        for topic in list(self._topics.values()):
            self.link.unsubscribe(topic)
        self._topics.clear()
        if self._attached:
            self._attached = False
            self.link.detach(self)
        where = str(self.address)
        self._fail_all(
            lambda request_id, entry: ConnectionLostError(
                f"the client of {where} closed before the reply to {entry.method} "
                f"(id {request_id})",
                {"method": entry.method},
            )
        )
        if self._own_link:
            self.link.close()
        if self._own_scheduler:
            self.scheduler.close()


def _reason(status: dict[str, Any] | None) -> str:
    if status is None:
        return "never seen"
    reason = status.get("reason")
    return str(reason) if reason else "offline"


def _error_of(event: ErrorResponse) -> tuple[None, RpcError, bool]:
    return None, error_for(event.code, event.message, event.data), event.replayed


__all__ = ["LATE_WAIT", "MqttClient", "node_address"]
