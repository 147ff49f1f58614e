"""The fleet as its retained topics show it: each node's status and its devices' states, read
from the broker (``statelink fleet``; docs/fleet.md).

:class:`FleetWatch` subscribes ``P/+/status`` and ``P/+/state/+`` and keeps the newest message
of each topic. When is a snapshot complete? After the SUBACK the watch publishes a marker (QoS
1) to a private topic it also subscribes: the broker queued every retained message of the
subscription (QoS 1, delivered in order) before it read the marker, so they all arrive before
it. (A broker drops what it cannot queue: the watch's Receive Maximum lets it send up to
65535 messages at once, plus ``max_queued_messages`` waiting.) The same barrier runs after
every reconnect, into a fresh model that replaces the old one when its marker comes back (a
node whose topics were cleared meanwhile disappears).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from statemachines.addresses import BrokerUrl, parse_broker

from .connection import RECEIVE_MAXIMUM, BrokerError, new_client, start
from .options import MqttOptions
from .topics import STATE, STATUS, Topics

#: nodes a watch keeps; messages of further nodes are dropped (``FleetWatch.overflow``)
MAX_NODES = 10_000
#: device states kept per node; further devices are dropped (``FleetWatch.overflow``)
MAX_DEVICES = 256
#: bytes of one status or state payload; a longer one is shown as unreadable
MAX_PAYLOAD = 64 * 1024
#: changes kept until :meth:`FleetWatch.changes` takes them; the oldest go first
MAX_CHANGES = 10_000


def utc_now() -> str:
    """Now as ISO-8601 UTC to the second (``2025-06-01T10:00:00Z``), like the statuses'."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object) -> datetime | None:
    """An ISO-8601 time of a status (``Z`` or an offset; naive means UTC), else None."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@dataclass
class NodeView:
    """What the retained topics say about one node. ``status``: the payload of ``P/N/status``
    (None: none, or unreadable: then ``problem`` says why); ``states``: device -> the payload
    of ``P/N/state/DEVICE``; ``lost_at``: when this watch saw the node's Last Will arrive."""

    node: str
    status: dict[str, Any] | None = None
    problem: str | None = None
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    lost_at: str | None = None

    @property
    def online(self) -> bool | None:
        """True / False as the status says; None without a readable status."""
        return None if self.status is None else self.status["online"] is True

    @property
    def reason(self) -> str | None:
        """Why an offline node is offline: ``"lost"`` (its Last Will), ``"stopped"``, ..."""
        if self.status is None or self.online:
            return None
        reason = self.status.get("reason")
        return reason if isinstance(reason, str) else None

    def last_seen(self, now: str) -> str | None:
        """``now`` for an online node; for an offline one its status's ``at`` (else
        ``since``), or when this watch saw its Will; None when unknown."""
        if self.status is None:
            return None
        if self.online:
            return now
        for key in ("at", "since"):
            if isinstance(self.status.get(key), str):
                return str(self.status[key])
        return self.lost_at

    def devices(self) -> dict[str, str | None]:
        """Device -> its state (None: unknown), in the order of the status's device list (a
        retained state of a device not in that list is stale and left out)."""
        listed = self.status.get("devices") if self.status else None
        names = (
            [n for n in listed if isinstance(n, str)]
            if isinstance(listed, list)
            else sorted(self.states)
        )
        return {name: _state_name(self.states.get(name)) for name in names}

    def describe(self) -> str:
        """One phrase: ``online since T``, ``offline (stopped at T)``, ``offline (lost)``,
        ``status unknown``."""
        if self.status is None:
            return f"status unknown ({self.problem})" if self.problem else "status unknown"
        if self.online:
            since = self.status.get("since")
            return f"online since {since}" if isinstance(since, str) else "online"
        at = self.status.get("at")
        reason = self.reason or "no reason given"
        return f"offline ({reason} at {at})" if isinstance(at, str) else f"offline ({reason})"

    def empty(self) -> bool:
        return self.status is None and self.problem is None and not self.states

    def copy(self) -> NodeView:
        return NodeView(self.node, self.status, self.problem, dict(self.states), self.lost_at)

    def as_json(self, now: str) -> dict[str, Any]:
        """The node as ``statelink fleet --json`` prints it."""
        return {
            "node": self.node,
            "online": self.online,
            "reason": self.reason,
            "last_seen": self.last_seen(now),
            "devices": self.devices(),
            "status": self.status,
            "states": self.states,
            "problem": self.problem,
        }


def _state_name(params: dict[str, Any] | None) -> str | None:
    state = params.get("state") if params else None
    return state if isinstance(state, str) else None


@dataclass(frozen=True)
class Change:
    """One thing that changed while watching: ``node`` None is about the broker connection."""

    at: str
    node: str | None
    text: str


def node_changes(old: NodeView | None, new: NodeView | None, at: str) -> list[Change]:
    """What differs between two views of one node, as :class:`Change` lines."""
    either = new or old
    node = either.node if either is not None else ""
    changes = []
    before = old.describe() if old and not old.empty() else "gone"
    after = new.describe() if new and not new.empty() else "gone"
    if before != after:
        changes.append(Change(at, node, after))
    old_states, new_states = (old.states if old else {}), (new.states if new else {})
    for device in sorted(set(old_states) | set(new_states)):
        was, now = _state_name(old_states.get(device)), _state_name(new_states.get(device))
        if was == now and (device in old_states) == (device in new_states):
            continue  # the same state said again (a node announces its states at connect)
        command = (new_states.get(device) or {}).get("command")
        text = f"{device}: {was or '-'} -> {now or '-'}"
        changes.append(Change(at, node, text + (f" ({command})" if command else "")))
    return changes


def _decode(payload: bytes | bytearray, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object payload, or (None, why not)."""
    if len(payload) > MAX_PAYLOAD:
        return None, f"{what} over {MAX_PAYLOAD} bytes"
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None, f"{what} is not JSON"
    if not isinstance(value, dict):
        return None, f"{what} is not a JSON object"
    return value, None


class FleetWatch:
    """The fleet behind ``broker``, kept current from its retained topics.

    ``start()`` connects and returns once the snapshot is complete; then :meth:`nodes` is the
    fleet, and it stays current (``on_change()`` is called, on the paho thread, after each
    change) until :meth:`close`. Broker restarts are survived (reconnect with backoff, then
    the fleet is read again)."""

    def __init__(
        self,
        broker: BrokerUrl | str,
        options: MqttOptions | None = None,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.broker = parse_broker(broker)
        self.options = options or MqttOptions()
        self.topics = Topics(self.options.topic_prefix)
        self.on_change = on_change
        self.connected = False
        #: True once a message of a node or device beyond the bounds was dropped
        self.overflow = False
        self._client_id = f"statelink-fleet-{secrets.token_hex(6)}"
        #: the barrier's topic: the reply topic named after this watch's client id (an ACL
        #: ``pattern readwrite P/_reply/%c`` lets a read-only user have it; docs/fleet.md)
        self._marker = self.topics.reply(self._client_id)
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeView] = {}
        self._pending: dict[str, NodeView] | None = None  # rebuilt until the barrier
        self._generation = 0
        self._synced_once = False
        self._synced = threading.Event()
        self._failure: str | None = None
        self._changes: deque[Change] = deque(maxlen=MAX_CHANGES)
        self._client: mqtt.Client | None = None

    def start(self, timeout: float | None = None) -> FleetWatch:
        """Connect, subscribe, and wait (at most ``timeout`` seconds, default the options'
        connect timeout) until every retained status and state has arrived. Raises
        :class:`BrokerError` (one line: what failed and what to check)."""
        wait = timeout if timeout is not None else self.options.connect_timeout
        client = new_client(self._client_id, self.broker, self.options)
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        self._client = client
        start(
            client,
            self.broker,
            self.options,
            self._on_connect,
            clean_start=True,
            session_expiry=0,
            receive_maximum=RECEIVE_MAXIMUM,
        )
        if not self._synced.wait(wait) or self._failure:
            self.close()
            raise BrokerError(
                self._failure
                or f"the MQTT broker {self.broker} did not echo this watch's marker on "
                f"{self._marker} within {wait:g} s (may this user read and write it? is the "
                "fleet larger than the broker's max_queued_messages?)"
            )
        return self

    def nodes(self) -> list[NodeView]:
        """The nodes, by name (copies)."""
        with self._lock:
            return [self._nodes[name].copy() for name in sorted(self._nodes)]

    def changes(self) -> list[Change]:
        """The changes since the last call, oldest first (at most :data:`MAX_CHANGES`)."""
        with self._lock:
            taken = list(self._changes)
            self._changes.clear()
            return taken

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> FleetWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paho thread ----------------------------------------------------------------------
    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _on_connect(self, _session_present: bool) -> None:
        client = self._client
        if client is None:  # closed meanwhile
            return
        with self._lock:
            self._generation += 1
            self._pending = {}
            self.connected = True
            if self._synced_once:
                self._changes.append(Change(utc_now(), None, "broker connection back"))
        qos1 = SubscribeOptions(qos=1)
        client.subscribe(
            [
                (self.topics.status(), qos1),
                (self.topics.state("+"), qos1),
                (self._marker, qos1),
            ]
        )
        self._notify()

    def _on_subscribe(
        self, client: mqtt.Client, _userdata: Any, _mid: int, codes: list[Any], _props: Any
    ) -> None:
        refused = [str(code) for code in codes if code.is_failure]
        if refused:
            user = self.options.user or "anonymous clients"
            self._failure = (
                f"the MQTT broker {self.broker} refused the subscription: {refused[0]} "
                f"(may {user} read {self.topics.status()}, {self.topics.state('+')} and "
                f"read and write {self._marker}?)"
            )
            self._synced.set()
            return
        client.publish(self._marker, str(self._generation).encode(), qos=1)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        with self._lock:
            was, self.connected = self.connected, False
            if was and self._synced_once:
                self._changes.append(
                    Change(utc_now(), None, f"broker connection lost ({reason}); reconnecting")
                )
        self._notify()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._marker:
            self._barrier(msg.payload)
            return
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed[0].startswith("_"):
            return
        node, kind, rest = parsed
        if kind not in (STATUS, STATE) or (kind == STATE and (not rest or "/" in rest)):
            return
        with self._lock:
            live = self._pending is None
            model = self._nodes if live else self._pending
            assert model is not None
            old = model.get(node)
            view = old.copy() if old is not None else NodeView(node)
            if old is None and len(model) >= MAX_NODES:
                self.overflow = True
                return
            if not self._apply(view, kind, rest, msg):
                return
            if view.empty():
                model.pop(node, None)
            else:
                model[node] = view
            if live:
                self._changes.extend(node_changes(old, view, utc_now()))
        if live:
            self._notify()

    def _apply(self, view: NodeView, kind: str, device: str, msg: mqtt.MQTTMessage) -> bool:
        """Apply one message to ``view``; False when it was dropped (a bound)."""
        payload = msg.payload
        if kind == STATUS:
            lost_at = view.lost_at  # kept while the node stays lost
            view.status, view.problem, view.lost_at = None, None, None
            if payload:  # an empty retained message clears the topic
                status, problem = _decode(payload, "status")
                if status is not None and not isinstance(status.get("online"), bool):
                    status, problem = None, 'status has no "online": true/false'
                view.status, view.problem = status, problem
            if view.status is not None and view.reason == "lost":
                view.lost_at = lost_at or (None if msg.retain else utc_now())
            return True
        if not payload:
            view.states.pop(device, None)
            return True
        if device not in view.states and len(view.states) >= MAX_DEVICES:
            self.overflow = True
            return False
        params, problem = _decode(payload, "state")
        view.states[device] = params if params is not None else {"problem": problem}
        return True

    def _barrier(self, payload: bytes | bytearray) -> None:
        with self._lock:
            if self._pending is None or payload != str(self._generation).encode():
                return  # a marker of an earlier connection
            old, self._nodes, self._pending = self._nodes, self._pending, None
            for name, view in self._nodes.items():  # a Will seen before the reconnect
                before = old.get(name)
                if view.reason == "lost" and before is not None and before.reason == "lost":
                    view.lost_at = before.lost_at
            if self._synced_once:  # a reconnect: what changed while away
                now = utc_now()
                for name in sorted(set(old) | set(self._nodes)):
                    self._changes.extend(node_changes(old.get(name), self._nodes.get(name), now))
            self._synced_once = True
        self._synced.set()
        self._notify()


def fleet_snapshot(
    broker: BrokerUrl | str, options: MqttOptions | None = None, timeout: float | None = None
) -> list[NodeView]:
    """The nodes behind ``broker`` now (one complete read of the retained topics)."""
    with FleetWatch(broker, options) as watch:
        watch.start(timeout)
        return watch.nodes()


__all__ = ["Change", "FleetWatch", "NodeView", "fleet_snapshot", "node_changes", "utc_now"]
