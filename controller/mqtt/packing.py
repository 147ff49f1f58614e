"""PUBLISH properties packed once, for the per-message path.

paho's :class:`~paho.mqtt.properties.Properties` validates every assignment against tables it
builds per instance, and ``pack()`` walks all 27 property names: about 11 us to build and 6 us
to pack a Correlation Data on the benchmark machine, per reply. :func:`packed` builds the same
bytes directly (MQTT 5.0, 2.2.2: a Variable Byte Integer length, then identifier + value per
property) and wraps them in a :class:`PackedProperties` that paho takes wherever it takes a
``Properties`` (it only calls ``pack()`` on outgoing properties).
"""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_MESSAGE_EXPIRY = b"\x02"  #: Four Byte Integer
_RESPONSE_TOPIC = b"\x08"  #: UTF-8 Encoded String
_CORRELATION_DATA = b"\x09"  #: Binary Data
_USER_PROPERTY = b"\x26"  #: UTF-8 String Pair


class PackedProperties(Properties):
    """PUBLISH properties whose wire form is ready (see :func:`packed`); immutable."""

    _packed: bytes

    def __init__(self, packed: bytes) -> None:
        # Properties.__setattr__ would validate these as property names: bypass it.
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:  # paho's debug log line formats outgoing properties
        return f"PackedProperties({self._packed.hex()})"

    __repr__ = __str__


def packed(
    *,
    correlation: bytes | None = None,
    response_topic: str | None = None,
    expiry: int | None = None,
    user: list[tuple[str, str]] | None = None,
) -> PackedProperties:
    """PUBLISH properties (each only when given) as :func:`controller.mqtt.connection.
    publish_properties` makes them, packed at once: Correlation Data (at most 65535 bytes),
    Response Topic, Message Expiry Interval (seconds, at least 1) and User Properties."""
    body = b""
    if expiry is not None:
        body += _MESSAGE_EXPIRY + max(1, int(expiry)).to_bytes(4, "big")
    if response_topic is not None:
        body += _RESPONSE_TOPIC + _string(response_topic.encode())
    if correlation is not None:
        body += _CORRELATION_DATA + _string(correlation)
    for name, value in user or ():
        body += _USER_PROPERTY + _string(name.encode()) + _string(value.encode())
    return PackedProperties(_varint(len(body)) + body)


def _string(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"an MQTT property value holds at most 65535 bytes, not {len(data)}")
    return len(data).to_bytes(2, "big") + data


def _varint(value: int) -> bytes:
    """The Variable Byte Integer of ``value`` (MQTT 5.0, 1.5.5)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
