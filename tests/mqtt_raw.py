"""A raw paho-mqtt 2.x MQTT 5 client for tests: what a test publishes or expects on the wire,
without statelink's own MQTT code in between. Every wait is bounded (``support.WAIT``)."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions
from support import WAIT

from statemachines.addresses import parse_broker


class RawMqtt:
    """One connected client. ``refused``: the CONNACK's reason when the broker refused the
    login (then nothing else works). Received messages queue up in ``messages`` as
    ``(topic, payload, retain)``."""

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        client_id: str = "",
        will: tuple[str, bytes] | None = None,
        tls_ca: str | None = None,
    ) -> None:
        broker = parse_broker(url)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        if broker.tls:
            self.client.tls_set(ca_certs=tls_ca)
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.refused: str | None = None
        self._acks: dict[int, str] = {}
        self._acked = threading.Condition()
        connected = threading.Event()

        def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                self.refused = str(reason)
            connected.set()

        def on_ack(mid: int, reason: str) -> None:
            with self._acked:
                self._acks[mid] = reason
                self._acked.notify_all()

        self.client.on_connect = on_connect
        self.client.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.client.on_publish = lambda _c, _u, mid, reason, _p: on_ack(mid, str(reason))
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: on_ack(
            mid, ",".join(str(code) for code in codes)
        )
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not connected.wait(WAIT):
            self.close()
            raise AssertionError(f"no CONNACK from {url} within {WAIT} s")
        if self.refused:
            self.client.loop_stop()

    def _wait_ack(self, mid: int) -> str:
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, WAIT):
                raise AssertionError(f"no acknowledgement of message {mid} within {WAIT} s")
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: Any, *, retain: bool = False) -> str:
        """Publish at QoS 1 (``payload``: bytes, str, or a value sent as JSON) and wait for
        the PUBACK: its reason (``"Success"``, ``"Not authorized"``...)."""
        if not isinstance(payload, (bytes, str)):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)

    def subscribe(self, *filters: str) -> str:
        """Subscribe at QoS 1 and wait for the SUBACK: its reason codes, comma separated."""
        _result, mid = self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        return self._wait_ack(mid)

    def next_message(self, timeout: float = WAIT) -> tuple[str, bytes, bool]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> RawMqtt:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def status(node: str, online: bool, **fields: Any) -> dict[str, Any]:
    """A status payload as the contract has it (``fields`` add or override keys)."""
    if online:
        base: dict[str, Any] = {
            "online": True,
            "node": node,
            "since": "2025-06-01T10:00:00Z",
            "version": "test",
            "protocol": "1.0",
            "devices": [],
            "max_inflight": 256,
        }
    else:
        base = {"online": False, "node": node, "reason": "lost"}
    return {**base, **fields}


def state(device: str, current: str, previous: str | None = None, command: Any = None) -> dict:
    """A ``device.state`` params payload."""
    return {
        "device": device,
        "state": current,
        "previous": previous or current,
        "command": command,
    }
