"""The client side's reading: a connection's bytes -> decoded messages, one line at a time.

Unlike the server, a client must never drop a reply it cannot decode: its request would
wait for a timeout and then perhaps be retried. A line over the frame limit, or one that is
not valid (nested deeper than the depth limit, not JSON, not a reply), becomes an
:class:`Undecodable` event carrying the ``id`` found in the line and the reason, so that the
request with that id fails at once. The limits are the server's own: the protocol's
``DEFAULT_MAX_FRAME`` / ``DEFAULT_MAX_DEPTH``, or what its ``rpc.hello`` announces
(``max_frame``, ``max_depth``). An over-long line is skipped up to its newline and the
connection goes on.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .protocol import DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME, Decoder, Event, Id, Invalid

#: characters at the start of an over-long line searched for its ``id``
ID_SCAN_LIMIT = 4096

_WHITESPACE = " \t\r\n"
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_raw_decode = json.JSONDecoder().raw_decode


class _NoId:
    """The marker of a line in which no usable ``id`` was found."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()


@dataclass(slots=True)
class Undecodable:
    """A line the client could not decode. ``id``: the top-level ``"id"`` found in it
    (:data:`NO_ID` when none); ``reason`` says why, ``data`` the numbers behind it."""

    id: Id | _NoId
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


def limits_of(info: Mapping[str, Any]) -> tuple[int, int]:
    """``(max_frame, max_depth)`` a server announced in ``rpc.hello``, else the defaults."""

    def positive(name: str, default: int) -> int:
        value = info.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value if ok else default  # type: ignore[return-value]

    return positive("max_frame", DEFAULT_MAX_FRAME), positive("max_depth", DEFAULT_MAX_DEPTH)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _skip_value(text: str, i: int) -> int:
    """The end of the JSON value starting at ``i`` (strings and nesting skipped without
    decoding, so any depth is fine); ``len(text)`` when it is cut short."""
    if i >= len(text):
        return len(text)
    if text[i] == '"':
        return _scanstring(text, i + 1)[1]
    if text[i] not in "[{":
        while i < len(text) and text[i] not in ",}]" + _WHITESPACE:
            i += 1
        return i
    depth = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = _scanstring(text, i + 1)[1]
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def find_id(text: str) -> Id | _NoId:
    """The top-level ``"id"`` member of the JSON object ``text``, which may be cut short or
    nested too deep to decode; :data:`NO_ID` when there is none (or it is not a valid id)."""
    try:
        i = _skip_ws(text, 0)
        if text[i : i + 1] != "{":
            return NO_ID
        i += 1
        while True:
            i = _skip_ws(text, i)
            if text[i : i + 1] != '"':
                return NO_ID
            name, i = _scanstring(text, i + 1)
            i = _skip_ws(text, i)
            if text[i : i + 1] != ":":
                return NO_ID
            i = _skip_ws(text, i + 1)
            if name == "id":
                value, _ = _raw_decode(text, i)
                valid = value is None or (
                    isinstance(value, (str, int, float)) and not isinstance(value, bool)
                )
                return value if valid else NO_ID
            i = _skip_ws(text, _skip_value(text, i))
            if text[i : i + 1] != ",":
                return NO_ID
            i += 1
    except (ValueError, IndexError, RecursionError):
        return NO_ID


class ReplyReader:
    """Splits a byte stream into lines and decodes each (:meth:`feed`); never raises.

    Events are those of :class:`~controller.protocol.Decoder` (replies, notifications,
    batches), except that a line it cannot decode is an :class:`Undecodable` instead of an
    ``Invalid``, and a line over ``max_frame`` is skipped (not fatal).
    """

    __slots__ = ("_buffer", "_decoder", "_head", "_skipped", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_depth: int = DEFAULT_MAX_DEPTH):
        self.max_frame = max_frame
        self._decoder = Decoder(max_frame, max_depth)
        self._buffer = bytearray()
        self._head: bytes | None = None  #: the start of the over-long line being skipped
        self._skipped = 0

    def feed(self, data: bytes) -> list[Event | Undecodable]:
        events: list[Event | Undecodable] = []
        if self._head is not None:  # inside an over-long line: skip to its newline
            end = data.find(b"\n")
            if end < 0:
                self._skipped += len(data)
                return events
            events.append(self._too_long(self._head, self._skipped + end))
            self._head = None
            data = data[end + 1 :]
        buffer = self._buffer
        limit = self.max_frame
        if b"\n" not in data:
            buffer += data
            if len(buffer) > limit + 1:
                self._head, self._skipped = bytes(buffer[:ID_SCAN_LIMIT]), len(buffer)
                buffer.clear()
            return events
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if len(line) > limit and not (len(line) == limit + 1 and line[-1] == 0x0D):
                events.append(self._too_long(line[:ID_SCAN_LIMIT], len(line)))
                continue
            event = self._decoder.decode_line(line)
            if isinstance(event, Invalid):
                events.append(self._undecodable(line, event))
            elif event is not None:
                events.append(event)
        if len(rest) > limit + 1:
            self._head, self._skipped = rest[:ID_SCAN_LIMIT], len(rest)
        else:
            buffer += rest
        return events

    def _too_long(self, head: bytes, size: int) -> Undecodable:
        return Undecodable(
            find_id(head.decode("utf-8", "replace")),
            f"the line is {size} bytes, over the frame limit of {self.max_frame} bytes",
            {"size": size, "max_frame": self.max_frame},
        )

    @staticmethod
    def _undecodable(line: bytes, invalid: Invalid) -> Undecodable:
        reason = invalid.message
        if isinstance(invalid.data, dict) and "reason" in invalid.data:
            reason = f"{reason}: {invalid.data['reason']}"
        found = invalid.id if invalid.id is not None else find_id(line.decode("utf-8", "replace"))
        data = dict(invalid.data) if isinstance(invalid.data, dict) else {}
        return Undecodable(found, reason, data)


def read_events(
    sock: socket.socket,
    closed: threading.Event,
    on_event: Callable[[Any], None],
    reader: ReplyReader | None = None,
) -> None:
    """Decode lines from ``sock`` into ``on_event`` until EOF, an error, or ``closed`` is set
    (checked whenever the socket's timeout expires)."""
    reader = reader or ReplyReader()
    while True:
        try:
            data = sock.recv(262144)
        except TimeoutError:
            if closed.is_set():
                return
            continue
        except OSError:
            return
        if not data:
            return
        for event in reader.feed(data):
            on_event(event)


__all__ = [
    "ID_SCAN_LIMIT",
    "NO_ID",
    "ReplyReader",
    "Undecodable",
    "find_id",
    "limits_of",
    "read_events",
]
