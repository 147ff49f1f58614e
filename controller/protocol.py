"""The statelink wire protocol as a pure codec (sans-IO): bytes in, messages out, and back.

JSON-RPC 2.0, one JSON text per line (UTF-8, ``\\n`` terminated, ``\\r\\n`` accepted). No socket
code lives here: :class:`Decoder` turns received bytes into message objects and problems, and
:func:`encode` turns messages into bytes. The decoder never raises on any input.

>>> d = Decoder()
>>> d.feed(b'{"jsonrpc":"2.0","id":1,"method":"rpc.ping"}\\n')
[Request(method='rpc.ping', params=None, id=1, key=None)]
>>> encode(Response(id=1, result="pong"))
b'{"jsonrpc":"2.0","id":1,"result":"pong"}\\n'
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from statemachines.errorkinds import INVALID_REQUEST, PARSE_ERROR

DEFAULT_PORT = 15769
DEFAULT_MAX_FRAME = 1 << 20  #: bytes in one line, newline excluded
DEFAULT_MAX_DEPTH = 32  #: nesting of arrays/objects in one message
DEFAULT_MAX_BATCH = 100  #: calls in one batch
MAX_KEY_LENGTH = 128  #: characters in an idempotency key

Id = str | int | float | None
Params = list[Any] | dict[str, Any] | None

_MISSING: Any = object()


@dataclass(slots=True)
class Request:
    """A call that expects exactly one reply carrying the same ``id``.

    ``key`` is the optional idempotency key (top-level member ``"key"``, see :func:`check_key`):
    device commands with the same key run at most once.
    """

    method: str
    params: Params = None
    id: Id = None
    key: str | None = None


@dataclass(slots=True)
class Notification:
    """A call without ``id``: it is never answered (both directions)."""

    method: str
    params: Params = None


@dataclass(slots=True)
class Response:
    """A successful reply. ``replayed``: the stored outcome of an earlier execution with the
    same key (on the wire: top-level ``"replayed": true``, omitted when false)."""

    id: Id
    result: Any = None
    replayed: bool = False


@dataclass(slots=True)
class ErrorResponse:
    """An error reply. ``data`` is omitted on the wire when it is ``None``; ``replayed`` as
    for :class:`Response`."""

    id: Id
    code: int
    message: str
    data: Any = None
    replayed: bool = False


@dataclass(slots=True)
class Invalid:
    """Something that parsed but is not a valid message: answer it with this error.

    ``fatal`` means the connection cannot continue (the frame limit was exceeded).
    """

    code: int
    message: str
    id: Id = None
    fatal: bool = False
    data: Any = None

    def response(self) -> ErrorResponse:
        return ErrorResponse(self.id, self.code, self.message, self.data)


Message = Request | Notification | Response | ErrorResponse


@dataclass(slots=True)
class Batch:
    """A JSON array of calls (or replies). Items that were not valid are :class:`Invalid`."""

    items: list[Message | Invalid] = field(default_factory=list)


Event = Request | Notification | Response | ErrorResponse | Invalid | Batch


def _valid_id(value: Any) -> bool:
    """A string, a number a double can hold (a reply must be able to echo it), or null."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -_ID_INT_LIMIT < value < _ID_INT_LIMIT
    return value is None or isinstance(value, str)


_ID_INT_LIMIT = 2**1024  #: an integer id at or beyond this is no double: peers cannot echo it


class DuplicateKeyError(ValueError):
    """A JSON object names one member twice: ambiguous (which one would a proxy read?)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        name = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKeyError(f"the member {name!r} appears twice in one object")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_object)
_decode = _decoder.decode
_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``_decoder.decode(text)``, faster for the usual line: a text that is exactly one JSON
    value (no whitespace around it) is scanned by the C scanner at once, without ``decode``'s
    Python wrappers and whitespace regexes. Anything else, every error included, goes through
    ``decode`` itself, so the results and the error messages are the same."""
    try:
        obj, end = _scan_once(text, 0)
    except Exception:
        return _decode(text)
    if end != len(text):
        return _decode(text)
    return obj


def _depth_exceeds(text: str, limit: int) -> bool:
    """True when arrays/objects nest deeper than ``limit`` (strings are skipped)."""
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _invalid(reason: str, msg_id: Id = None) -> Invalid:
    return Invalid(INVALID_REQUEST, "Invalid Request", msg_id, data={"reason": reason})


def check_key(value: object) -> str:
    """``value`` if it is a valid idempotency key (1-128 printable characters), else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"key must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise ValueError(f"key must be 1-{MAX_KEY_LENGTH} characters long, not {len(value)}")
    if not value.isprintable():
        index = next(i for i, char in enumerate(value) if not char.isprintable())
        raise ValueError(
            f"key must be printable characters; character {index + 1} is {value[index]!r}"
        )
    return value


def parse_message(obj: Any) -> Message | Invalid:
    """Classify one decoded JSON value as a JSON-RPC message, or say why it is not one."""
    if not isinstance(obj, dict):
        return _invalid("expected a JSON object")
    raw_id = obj.get("id", _MISSING)
    if raw_id is not _MISSING and not _valid_id(raw_id):
        return _invalid("id must be a string, a number a double can hold (finite), or null")
    msg_id = None if raw_id is _MISSING else raw_id
    if obj.get("jsonrpc") != "2.0":
        return _invalid('"jsonrpc" must be "2.0"', msg_id)
    method = obj.get("method", _MISSING)
    if method is not _MISSING:
        if not isinstance(method, str):
            return _invalid("method must be a string", msg_id)
        params = obj.get("params", _MISSING)
        if params is _MISSING:
            params = None
        elif not isinstance(params, (list, dict)):
            return _invalid("params must be an array or an object", msg_id)
        key = obj.get("key")
        if key is not None or "key" in obj:
            try:
                check_key(key)
            except ValueError as exc:
                return _invalid(str(exc), msg_id)
        if raw_id is _MISSING:
            return Notification(method, params)
        return Request(method, params, raw_id, key)
    if raw_id is _MISSING:
        return _invalid("neither a method nor an id")
    if "result" in obj and "error" not in obj:
        return Response(raw_id, obj["result"], obj.get("replayed") is True)
    error = obj.get("error")
    if "result" not in obj and isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str):
            return ErrorResponse(
                raw_id, code, message, error.get("data"), obj.get("replayed") is True
            )
    return _invalid("not a request and not a response", msg_id)


class Decoder:
    """Turns a byte stream into events, one line at a time. Never raises.

    ``feed(data)`` returns the events completed by ``data``: messages, :class:`Batch` and
    :class:`Invalid` (answer it; close the connection when ``fatal``). After a fatal event the
    decoder returns nothing more.
    """

    __slots__ = ("_buffer", "closed", "max_batch", "max_depth", "max_frame")

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.max_frame = max_frame
        self.max_depth = max_depth
        self.max_batch = max_batch
        self._buffer = bytearray()
        self.closed = False

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete line."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        buffer = self._buffer
        if b"\n" not in data:
            buffer += data
            return [self._too_long()] if len(buffer) > self.max_frame + 1 else []
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        lines = data.split(b"\n")
        rest = lines.pop()
        events: list[Event] = []
        limit = self.max_frame
        for line in lines:
            if len(line) > limit and not (len(line) == limit + 1 and line[-1] == 0x0D):
                events.append(self._too_long())
                return events
            event = self.decode_line(line)
            if event is not None:
                events.append(event)
        if len(rest) > limit + 1:
            events.append(self._too_long())
        else:
            buffer += rest
        return events

    def finish(self) -> list[Event]:
        """The peer sent its last byte: a last line without ``\n`` is a message too."""
        if self.closed or not self._buffer:
            return []
        line = bytes(self._buffer)
        self._buffer.clear()
        event = self.decode_line(line)
        return [] if event is None else [event]

    def _too_long(self) -> Invalid:
        self.closed = True
        self._buffer.clear()
        return Invalid(
            INVALID_REQUEST,
            f"Invalid Request: line longer than the frame limit of {self.max_frame} bytes",
            None,
            fatal=True,
            data={"max_frame": self.max_frame},
        )

    def decode_line(self, line: bytes) -> Event | None:
        """Decode one line (without its ``\\n``); ``None`` for a blank line."""
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Invalid(
                PARSE_ERROR, "Parse error", data={"reason": f"invalid UTF-8 at byte {exc.start}"}
            )
        if not text.strip():
            return None
        if (text.count("[") + text.count("{") > self.max_depth) and _depth_exceeds(
            text, self.max_depth
        ):
            return Invalid(
                PARSE_ERROR,
                f"Parse error: nesting deeper than {self.max_depth} levels",
                data={"max_depth": self.max_depth},
            )
        try:
            obj = _loads(text)
        except DuplicateKeyError as exc:
            return _invalid(str(exc))
        except (ValueError, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else "nesting too deep"
            return Invalid(PARSE_ERROR, "Parse error", data={"reason": reason})
        if isinstance(obj, list):
            if not obj:
                return _invalid("empty batch")
            if len(obj) > self.max_batch:
                return Invalid(
                    INVALID_REQUEST,
                    f"Invalid Request: batch of {len(obj)} calls exceeds the limit of "
                    f"{self.max_batch}",
                    data={"max_batch": self.max_batch},
                )
            return Batch([parse_message(item) for item in obj])
        return parse_message(obj)


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_dumps_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_str = json.encoder.encode_basestring


def _dumps(obj: Any) -> str:
    """``_encoder.encode(obj)``: for a dict or list, the C encoder that ``encode`` would build,
    without ``iterencode``'s per-call Python set-up (same output, same errors)."""
    if _c_make_encoder is None or not isinstance(obj, (dict, list)):
        return _encoder.encode(obj)
    return _c_make_encoder({}, _encoder.default, _encode_str, None, ":", ",", False, False, False)(
        obj, 0
    )[0]


def _line(obj: Any) -> bytes:
    """Compact JSON text of ``obj`` plus ``\\n``, as UTF-8.

    A string holding a lone surrogate (JSON allows ``"\\ud800"``, and the decoder returns it as
    is) has no UTF-8 form: such a message is written with ``\\uXXXX`` escapes instead, which
    decodes to the same value.
    """
    try:
        return (_dumps(obj) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (_dumps_ascii(obj) + "\n").encode("ascii")


def to_obj(message: Message) -> dict[str, Any]:
    """The JSON object of one message."""
    obj: dict[str, Any]
    if isinstance(message, Response):
        obj = {"jsonrpc": "2.0", "id": message.id, "result": message.result}
        if message.replayed:
            obj["replayed"] = True
        return obj
    if isinstance(message, ErrorResponse):
        error: dict[str, Any] = {"code": message.code, "message": message.message}
        if message.data is not None:
            error["data"] = message.data
        obj = {"jsonrpc": "2.0", "id": message.id, "error": error}
        if message.replayed:
            obj["replayed"] = True
        return obj
    if isinstance(message, Request):
        obj = {"jsonrpc": "2.0", "id": message.id, "method": message.method}
        if message.key is not None:
            obj["key"] = message.key
    else:
        obj = {"jsonrpc": "2.0", "method": message.method}
    if message.params is not None:
        obj["params"] = message.params
    return obj


def encode(message: Message) -> bytes:
    """One message as one line of bytes.

    Raises ``TypeError``/``ValueError`` when a value is not JSON (e.g. a handler returned an
    object, or NaN); the server turns that into an internal error reply.
    """
    return _line(to_obj(message))


def encode_batch(messages: list[Message]) -> bytes:
    """Several messages as one JSON array line (the reply to a batch)."""
    return _line([to_obj(m) for m in messages])
