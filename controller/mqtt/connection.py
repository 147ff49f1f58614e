"""A paho-mqtt 2.x client set up the one way statelink uses it (MQTT 5, ``VERSION2``
callbacks, TCP_NODELAY, reconnect with backoff, bounded queues), and a blocking first connect
with a timeout and an error that says what to do.

Nagle: request/response over MQTT stalls on delayed ACKs unless both the broker
(``set_tcp_nodelay true``) and every client set TCP_NODELAY; every client made here does.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from statemachines.addresses import BrokerUrl

from .options import MqttOptions

#: QoS 1 messages a client keeps unacknowledged on the wire (paho's default of 20 throttles a
#: controller with many commands in flight)
MAX_INFLIGHT = 1000
#: messages a client queues while the broker is away or the window is full; beyond, a publish
#: fails at once (paho's MQTT_ERR_QUEUE_SIZE) instead of growing without bound
MAX_QUEUED = 10000
#: reconnect backoff, seconds (paho doubles from the first to the second)
RECONNECT_MIN, RECONNECT_MAX = 1, 30
#: the most QoS 1 messages a broker may send one client unacknowledged (MQTT 5 Receive
#: Maximum; Mosquitto's default is 20): what a controller or a fleet watch asks for, so that
#: replies of many nodes and the retained messages of a subscription go out at once instead
#: of waiting in the broker's queue, which drops messages beyond ``max_queued_messages``
RECEIVE_MAXIMUM = 65535

#: ``on_connect(session_present)``: called on the paho thread after every successful connect
OnConnect = Callable[[bool], None]


class BrokerError(ConnectionError):
    """The broker cannot be reached, or refused the connection (the message says why and
    what to check)."""


def new_client(
    client_id: str,
    broker: BrokerUrl,
    options: MqttOptions,
    *,
    will: tuple[str, bytes] | None = None,
) -> mqtt.Client:
    """A paho client for ``broker`` (not connected). ``will``: ``(topic, payload)`` published
    retained at QoS 1 by the broker when this client goes away uncleanly."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.on_socket_open = _nodelay
    client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(MAX_QUEUED)
    client.connect_timeout = options.connect_timeout
    if options.user is not None:
        client.username_pw_set(options.user, options.password)
    if broker.tls:
        try:
            client.tls_set(ca_certs=options.tls_ca)
        except OSError as exc:  # a missing or unreadable CA file (ssl.SSLError too)
            raise BrokerError(
                f"cannot load the CA bundle {options.tls_ca} (--tls-ca) for the MQTT broker "
                f"{broker}: {exc.strerror or exc}"
            ) from exc
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    return client


def start(
    client: mqtt.Client,
    broker: BrokerUrl,
    options: MqttOptions,
    on_connect: OnConnect,
    *,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int | None = None,
) -> None:
    """Connect ``client`` and start its network thread; return once the broker accepted the
    first connect (``on_connect`` has run by then). Later disconnects reconnect by themselves
    (with backoff) and call ``on_connect`` again. ``clean_start`` applies to the first connect
    only; ``session_expiry``: seconds the broker keeps the session (subscriptions, queued QoS 1
    messages) while this client is away. ``receive_maximum`` (1..65535; None: the broker's
    own limit, Mosquitto's ``max_inflight_messages``, 20 by default): QoS 1 messages the
    broker may send this client unacknowledged; what it holds beyond waits in its queue,
    which drops messages once ``max_queued_messages`` are waiting.

    Raises :class:`BrokerError` when the broker cannot be reached or refuses the connection
    within ``options.connect_timeout`` seconds (the client is stopped then)."""
    first = threading.Event()
    refused: list[str] = []

    def connected(
        _client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            if not first.is_set():
                refused.append(str(reason))
                # no reconnect: paho would first sleep its backoff (1 s), and loop_stop()
                # below waits for that sleep
                _client.disconnect()
                first.set()
            return
        on_connect(bool(getattr(flags, "session_present", False)))
        first.set()

    client.on_connect = connected
    properties = connect_properties(session_expiry, receive_maximum)
    # clean_start: a fresh session at the first connect only (reconnects resume it); without
    # it, never (a restarted node gets what was queued for it while it was away)
    clean = mqtt.MQTT_CLEAN_START_FIRST_ONLY if clean_start else False
    try:
        client.connect(
            broker.host,
            broker.port,
            keepalive=options.keepalive,
            clean_start=clean,
            properties=properties,
        )
    except (OSError, ValueError) as exc:
        raise unreachable(broker, exc) from exc
    client.loop_start()
    if not first.wait(options.connect_timeout) or refused:
        client.loop_stop()
        client.disconnect()
        raise refusal(broker, refused[0]) if refused else no_answer(broker, options)
    # From here on the paho thread reconnects by itself; connected() keeps forwarding.


def connect_properties(session_expiry: int, receive_maximum: int | None = None) -> Properties:
    """CONNECT properties: Session Expiry Interval, and Receive Maximum when given."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return properties


def unreachable(broker: BrokerUrl, exc: BaseException) -> BrokerError:
    """The error of a connect that could not reach ``broker`` (``exc``: why)."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason += " (give the CA that signed the broker's certificate with --tls-ca FILE)"
    return BrokerError(f"cannot reach the MQTT broker {broker}: {reason}")


def refusal(broker: BrokerUrl, reason: str) -> BrokerError:
    """The error of a connect that ``broker`` refused (its CONNACK's ``reason``)."""
    lowered = reason.lower()
    hint = (
        " (check --mqtt-user and the password)"
        if "authori" in lowered or "password" in lowered
        else ""
    )
    return BrokerError(f"the MQTT broker {broker} refused the connection: {reason}{hint}")


def no_answer(broker: BrokerUrl, options: MqttOptions) -> BrokerError:
    """The error of a connect that got no CONNACK in time."""
    hint = "" if broker.tls else " (a TLS port? then mqtts://)"
    return BrokerError(
        f"the MQTT broker {broker} did not answer within {options.connect_timeout:g} s{hint}"
    )


def publish_properties(
    *,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    expiry: int | None = None,
    user: list[tuple[str, str]] | None = None,
) -> Properties:
    """PUBLISH properties: Response Topic, Correlation Data, Message Expiry Interval (seconds,
    at least 1) and User Properties, each only when given."""
    properties = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    if expiry is not None:
        properties.MessageExpiryInterval = max(1, int(expiry))
    if user:
        properties.UserProperty = user
    return properties


def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a websocket wrapper)
        pass
