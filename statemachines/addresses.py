"""Server addresses: the one parser for ``HOST:PORT`` and ``NAME=HOST:PORT``.

Every place that takes an address (workflow ``servers:``, ``--server`` of ``run``, ``call`` and
``check``, :class:`controller.Client`) parses it here, so they all accept the same forms.
"""

from __future__ import annotations

DEFAULT_PORT = 15769  #: the command server's port when an address names none

Address = tuple[str, int]


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


def format_address(address: Address) -> str:
    """``("::1", 80) -> "[::1]:80"``, ``("pi", 15769) -> "pi:15769"``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
