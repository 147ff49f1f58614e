"""Server addresses: the one parser for ``HOST:PORT``, ``mqtt://BROKER[:PORT]/NODE`` and
``NAME=ADDRESS``.

Every place that takes an address (workflow ``servers:``, ``--server`` of ``run``, ``call`` and
``check``, :class:`controller.Client`) parses it here, so they all accept the same forms. A TCP
server is an :data:`Address` ``(host, port)``; a node of a fleet, reached through an MQTT broker,
is a :class:`NodeAddress`; :func:`parse_server` takes both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PORT = 15769  #: the command server's port when an address names none
MQTT_PORT = 1883  #: the broker's port for ``mqtt://`` when the URL names none
MQTTS_PORT = 8883  #: ... and for ``mqtts://`` (TLS)
DEFAULT_TOPIC_PREFIX = "statelink"  #: the first topic level(s) of every statelink topic

Address = tuple[str, int]

#: a node name or a topic prefix level: one MQTT topic level, no wildcards, no ``$`` start
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """An MQTT broker: ``mqtt://HOST[:PORT]`` (plain) or ``mqtts://HOST[:PORT]`` (TLS)."""

    scheme: str  #: "mqtt" or "mqtts"
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        return f"{self.scheme}://{format_address((self.host, self.port))}"


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One node of a fleet: the statelink server named ``node`` behind ``broker``
    (``mqtt://HOST[:PORT]/NODE``)."""

    broker: BrokerUrl
    node: str

    def __str__(self) -> str:
        return f"{self.broker}/{self.node}"


#: what a server address may be: a TCP ``(host, port)`` or a fleet node
ServerAddress = Address | NodeAddress


def is_mqtt_url(text: object) -> bool:
    """True for text that starts with ``mqtt://`` or ``mqtts://`` (any case)."""
    return isinstance(text, str) and text.strip().lower().startswith(("mqtt://", "mqtts://"))


def check_node_name(name: str, what: str = "node name") -> str:
    """``name`` if it is a valid node name (one topic level: 1-64 of ``A-Z a-z 0-9 _ . -``,
    starting with a letter or digit); else ValueError saying so."""
    if not isinstance(name, str) or not _LEVEL.fullmatch(name):
        raise ValueError(
            f"bad {what} {name!r}; use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_topic_prefix(prefix: str) -> str:
    """``prefix`` if it is a valid topic prefix (levels as :func:`check_node_name`, joined by
    ``/``); else ValueError."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("the topic prefix is empty; e.g. 'statelink' or 'lab/statelink'")
    for level in prefix.split("/"):
        check_node_name(level, f"topic prefix level in {prefix!r}:")
    return prefix


def parse_broker(value: str | BrokerUrl) -> BrokerUrl:
    """``"mqtt://HOST[:PORT]"`` or ``"mqtts://HOST[:PORT]"`` -> :class:`BrokerUrl` (ports
    1883 and 8883 by default). Raises ValueError saying what is wrong and what is expected.

    >>> parse_broker("mqtt://127.0.0.1"), str(parse_broker("mqtts://broker.lan:8884"))
    (BrokerUrl(scheme='mqtt', host='127.0.0.1', port=1883), 'mqtts://broker.lan:8884')
    """
    if isinstance(value, BrokerUrl):
        return value
    broker, node = _split_url(value)
    if node:
        raise ValueError(
            f"bad broker URL {value!r}: no path expected; write mqtt://HOST[:PORT] "
            f"(a node is named with --node, or in a server address mqtt://HOST/{node})"
        )
    return broker


def parse_server(value: str | Address | NodeAddress) -> ServerAddress:
    """Any server address: ``mqtt://HOST[:PORT]/NODE`` (or ``mqtts://``) -> :class:`NodeAddress`;
    anything else as :func:`parse_address`. Raises ValueError saying what is expected.

    >>> str(parse_server("mqtt://broker/pi-1")), parse_server("pi:80")
    ('mqtt://broker:1883/pi-1', ('pi', 80))
    """
    if isinstance(value, NodeAddress):
        return value
    if not is_mqtt_url(value):
        return parse_address(value)
    assert isinstance(value, str)
    broker, node = _split_url(value)
    if not node:
        raise ValueError(
            f"no node in {value!r}; expected {broker.scheme}://HOST[:PORT]/NODE "
            "(the node's --node name)"
        )
    return NodeAddress(broker, check_node_name(node))


def _split_url(value: str) -> tuple[BrokerUrl, str]:
    if not is_mqtt_url(value):
        raise ValueError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {value!r}")
    scheme, _, rest = value.strip().partition("://")
    scheme = scheme.lower()
    hostport, _, path = rest.partition("/")
    if "@" in hostport or "?" in rest or "#" in rest:
        raise ValueError(
            f"bad broker URL {value!r}: credentials and options are not part of the URL; "
            "use --mqtt-user, --mqtt-password-file (or STATELINK_MQTT_PASSWORD) and --tls-ca"
        )
    host, port = parse_address(hostport, MQTTS_PORT if scheme == "mqtts" else MQTT_PORT)
    return BrokerUrl(scheme, host, port), path.strip("/")


def parse_address(value: str | Address, default_port: int = DEFAULT_PORT) -> Address:
    """``"host:port"``, ``"[::1]:port"``, ``"host"`` or ``(host, port)`` -> ``(host, port)``.

    Raises ValueError saying what is wrong and what is expected.

    >>> parse_address("127.0.0.1:15769"), parse_address("[::1]:80"), parse_address("pi")
    (('127.0.0.1', 15769), ('::1', 80), ('pi', 15769))
    """
    if isinstance(value, tuple):
        return (str(value[0]), int(value[1]))
    if not isinstance(value, str):
        raise ValueError(f"expected an address HOST:PORT, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}; expected [IPV6]:PORT")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif text.count(":") > 1:
        raise ValueError(f"bad address {value!r}; write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in address {value!r}; expected HOST:PORT")
    if port and not port.isdigit():
        raise ValueError(f"bad port in address {value!r}; expected HOST:PORT")
    number = int(port) if port else default_port
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in address {value!r}; expected 1..65535")
    return (host, number)


def split_named(text: str) -> tuple[str | None, str]:
    """``"NAME=ADDRESS"`` -> ``(NAME, ADDRESS)``; a bare ``"ADDRESS"`` -> ``(None, ADDRESS)``.

    Raises ValueError for an empty name or an empty address.

    >>> split_named("device=127.0.0.1:15769"), split_named("127.0.0.1:15769")
    (('device', '127.0.0.1:15769'), (None, '127.0.0.1:15769'))
    """
    name, sep, address = text.partition("=")
    if not sep:
        return None, text.strip()
    name, address = name.strip(), address.strip()
    if not name or not address:
        raise ValueError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, address


def format_address(address: ServerAddress) -> str:
    """``("::1", 80) -> "[::1]:80"``, ``("pi", 15769) -> "pi:15769"``; a node address as its
    URL (``"mqtt://broker:1883/pi-1"``)."""
    if isinstance(address, NodeAddress):
        return str(address)
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
