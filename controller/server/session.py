"""The session rules, sans-IO: one peer's decoded messages in, encoded replies out.

A :class:`Session` owns what a peer has in flight and applies the rules every transport
shares: the auth gate (only ``rpc.hello`` before login), one request per id in flight, the
in-flight bound (busy beyond it), batches (one array reply once every item is answered), and
exactly one reply per request. It never touches a socket: the transport hands it decoded
events (:meth:`Session.feed`) and gives it ``send(bytes)`` for the replies and ``hangup(reason)``
to close the peer. Loop thread only (the core's loop). tests/test_session.py drives it with
no socket at all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from statemachines import errorkinds as ek

from ..errors import (
    BusyError,
    InternalError,
    InvalidRequestError,
    MethodNotFoundError,
    RpcError,
    UnauthorizedError,
)
from ..protocol import (
    Batch,
    ErrorResponse,
    Event,
    Invalid,
    Message,
    Notification,
    Request,
    encode,
)
from .calls import Call, reply_too_large
from .core import Core

log = logging.getLogger("statelink.server")
#: one INFO line per command answered (``statelink serve --quiet`` turns it off)
call_log = logging.getLogger("statelink.server.calls")


class ReplyLink(Protocol):
    """Another way to the peer for replies (the TCP callback link: :mod:`.callback`)."""

    host: str
    port: int
    usable: bool  #: False once it failed or was closed: replies go the session's way again

    def write(self, data: bytes) -> None: ...

    def when_ready(self, callback: Callable[[str | None], None]) -> None:
        """``callback(None)`` once connected, ``callback(error)`` once it cannot be."""

    def close(self, abort: bool = False) -> None: ...


class BatchReply:
    """Collects the replies of one batch and sends them as one array when all are answered."""

    __slots__ = ("direct", "remaining", "replies", "session")

    def __init__(self, session: Session, size: int):
        self.session = session
        self.remaining = size
        self.replies: list[Message] = []
        #: answered on the request connection, not the callback link (it holds an rpc.hello)
        self.direct = False

    def add(self, reply: Message | None) -> None:
        if reply is not None:
            self.replies.append(reply)
        self.remaining -= 1
        if self.remaining == 0 and self.replies:
            session = self.session
            encode_reply = session.encode_reply
            parts = [encode_reply(reply)[:-1] for reply in self.replies]
            limit = session.limits.max_frame
            size = sum(map(len, parts)) + len(parts) + 1  # commas and brackets
            # Each reply fits a frame, but together they may not: the largest results become
            # too-large errors until the array fits (the others are answered as usual).
            for index in sorted(range(len(parts)), key=lambda i: -len(parts[i])):
                if size <= limit:
                    break
                too_large = encode_reply(session.too_large(self.replies[index], len(parts[index])))
                size += len(too_large) - 1 - len(parts[index])
                parts[index] = too_large[:-1]
            data = b"[" + b",".join(parts) + b"]\n"
            if self.direct:
                session.send(data)
            else:
                session.deliver(data)


class Session:
    """One peer of a :class:`Core`: its calls in flight, subscriptions and login state.

    ``send(data)`` queues encoded bytes (one reply, one batch array, or one notification, each
    ``\\n`` terminated) to the peer; ``hangup(reason)`` asks the transport to close it (after
    what is queued); ``connect_back(port)`` opens a :class:`ReplyLink` to the peer when the
    transport can (``rpc.hello``'s ``callback_port``; it starts connecting at once). The
    transport calls :meth:`close` once the peer is gone.

    Replies go over the callback link while it is usable (:meth:`deliver`), except
    ``rpc.hello``'s own and those with id ``null`` (nothing on the link could match them);
    notifications always go on the request connection.
    """

    __slots__ = (  # one per connection: no instance dict (S5 memory per idle connection)
        "_started",
        "auth_failures",
        "authenticated",
        "callback",
        "callback_port",
        "calls",
        "challenge",
        "client_name",
        "client_nonce",
        "closed",
        "connect_back",
        "core",
        "deadlines",
        "draining",
        "hangup",
        "inflight",
        "limits",
        "log_calls",
        "notified",
        "peer",
        "send",
        "stats",
        "subscriptions",
    )

    def __init__(
        self,
        core: Core,
        send: Callable[[bytes], None],
        peer: str,
        *,
        hangup: Callable[[str], None] | None = None,
        connect_back: Callable[[int], ReplyLink] | None = None,
    ):
        self.core = core
        self.send = send
        self.peer = peer
        self.hangup = hangup or _no_hangup
        self.connect_back = connect_back
        # the core's, held here too: the per-request path reaches them in one hop
        self.stats = core.stats
        self.deadlines = core.deadlines
        self.limits = core.limits
        self.calls: dict[Any, Call] = {}
        self.inflight = 0
        self.subscriptions: set[str] = set()
        self.authenticated = core.secret is None
        self.auth_failures = 0
        self.challenge: str | None = None
        self.client_nonce = ""
        self.client_name = ""
        self.callback: ReplyLink | None = None
        self.callback_port: int | None = None  #: asked for in rpc.hello; linked once logged in
        self.notified = 0  #: notifications sent (a transport counts them as activity)
        self.closed = False  #: nothing more is sent: the transport closes, or the peer is gone
        self.draining = False  #: the peer sends no more: hang up after the last reply
        #: log each command (decided once per session: nothing to do per request when off)
        self.log_calls = call_log.isEnabledFor(logging.INFO)
        self._started: dict[Call, float] = {}  #: when each call began, when logging
        core.sessions.add(self)

    # -- input --------------------------------------------------------------------------------
    def feed(self, event: Event, batch: BatchReply | None = None) -> None:
        """Handle one decoded event (a request, notification, batch, invalid message, or a
        response, which a server does not take)."""
        if isinstance(event, (Request, Notification)):
            self.start_call(event, batch)
        elif isinstance(event, Batch):
            reply = BatchReply(self, len(event.items))
            reply.direct = any(
                isinstance(item, Request) and item.method == "rpc.hello" for item in event.items
            )
            for item in event.items:
                self.feed(item, reply)
        elif isinstance(event, Invalid):
            self.stats.count_error(event.code)
            if batch is not None:
                batch.add(event.response())
            elif event.id is None:
                self.send(self.encode_reply(event.response()))
            else:  # a known id: its reply goes the way of every other reply
                self.deliver(self.encode_reply(event.response()))
            if event.fatal:
                self.hangup("frame_limit")
        else:  # a response sent to the server: not a request
            invalid = Invalid(
                ek.INVALID_REQUEST,
                "Invalid Request",
                event.id,
                data={"reason": "the server does not take responses"},
            )
            self.feed(invalid, batch)

    def start_call(self, msg: Request | Notification, batch: BatchReply | None) -> None:
        core = self.core
        self.stats.requests_total += 1
        call = Call(self, msg, batch)
        if self.log_calls:
            self._started[call] = time.monotonic()
        self.inflight += 1
        core.inflight += 1
        if not call.is_notification and self.calls.setdefault(call.id, call) is not call:
            # Another request with this id is in flight here (one dict lookup either way).
            if call.id is not None:
                call.reject(
                    InvalidRequestError(
                        "Invalid Request: a request with this id is already in flight on this "
                        "connection",
                        {"reason": "the id is already in flight on this connection"},
                    )
                )
                return
            # null ids may repeat (they cannot be told apart anyway): keyed by the call itself
            self.calls[call] = call
        method = msg.method
        if not self.authenticated and method != "rpc.hello":
            self.auth_failed(call, "authenticate with rpc.hello before calling other methods")
            return
        if core.stopping:
            call.reject(BusyError("server is shutting down", {"retry": True}))
            return
        if self.inflight > self.limits.max_inflight:
            call.reject(
                BusyError(
                    f"too many requests in flight on this connection (limit "
                    f"{self.limits.max_inflight}); wait for replies",
                    {"max_inflight": self.limits.max_inflight, "retry": True},
                )
            )
            return
        entry = core.methods.get(method)
        if entry is None:
            call.reject(MethodNotFoundError("Method not found"))
            return
        try:
            entry.start(call)
        except RpcError as exc:
            call.reject(exc)
        except Exception as exc:
            log.exception("dispatch of %s failed", method)
            call.reject(InternalError(f"Internal error: {type(exc).__name__}"))

    def auth_failed(self, call: Call, message: str) -> None:
        """Refuse ``call`` unauthorized; hang up after ``max_auth_failures``."""
        self.auth_failures += 1
        call.reject(UnauthorizedError(message, {"auth": "hmac-sha256"}))
        if self.auth_failures >= self.limits.max_auth_failures:
            self.hangup("auth_failures")

    def forget(self, call: Call) -> None:
        """Bookkeeping when a call is answered."""
        self.inflight -= 1
        core = self.core
        core.inflight -= 1
        if not call.is_notification:
            calls = self.calls
            if calls.get(call.id) is call:
                del calls[call.id]
            elif call.id is None:  # a null id that was in flight twice (see start_call)
                calls.pop(call, None)
        if core.inflight == 0 and core.drained is not None:
            core.drained.set()
        if self.draining and not self.calls:
            # The peer half-closed and this was its last reply: hang up once it is written
            # (scheduled, so the reply queued right after this is sent first).
            core.loop.call_soon(self.hangup, "eof")

    # -- output -------------------------------------------------------------------------------
    def reply(self, call: Call, message: Message) -> None:
        self.stats.replies_total += 0 if call.is_notification else 1
        if self.log_calls:
            self._log_call(call, message)
        if call.batch is not None:
            call.batch.add(None if call.is_notification else message)
            return
        if call.is_notification:
            return
        data = self.encode_reply(message, call.method)
        # rpc.hello is answered on the request connection: the client reads that reply there
        # (its handshake runs before any callback delivery can be relied on).
        link = self.callback
        if link is not None and link.usable and call.method != "rpc.hello":
            link.write(data)
        else:
            self.send(data)

    def deliver(self, data: bytes) -> None:
        """Send encoded reply bytes: over the callback link while it is usable, else on the
        request connection."""
        link = self.callback
        if link is not None and link.usable:
            link.write(data)
        else:
            self.send(data)

    def _log_call(self, call: Call, message: Message) -> None:
        """The INFO line of one answered command: method, device, outcome, ms, peer."""
        began = self._started.pop(call, None)
        ms = "?" if began is None else f"{(time.monotonic() - began) * 1000:.1f}"
        code = getattr(message, "code", None)
        runtime = getattr(self.core.methods.get(call.method), "runtime", None)
        device = getattr(getattr(runtime, "spec", None), "name", None) or "-"
        call_log.info(
            "%s device=%s %s %s ms peer=%s",
            call.method,
            device,
            "ok" if code is None else ek.kind_of(code),
            ms,
            self.peer,
        )

    def encode_reply(self, message: Message, method: str | None = None) -> bytes:
        """Encode one reply; a result that is not JSON, or too large for a frame, becomes an
        internal error for its id (the connection carries on). The error names ``method``
        (the call's, when known) and the type that is not JSON, and is logged here too: it
        is a handler's bug, which the server's operator must see."""
        try:
            data = encode(message)
        except (TypeError, ValueError, RecursionError) as exc:  # Recursion: nested too deep
            self.stats.count_error(ek.INTERNAL_ERROR)
            msg_id = getattr(message, "id", None)
            if isinstance(msg_id, float) and not math.isfinite(msg_id):
                msg_id = None  # e.g. "id": 1e400 decodes to inf, which has no JSON form
            culprit = _not_json(getattr(message, "result", None))
            of = f"the result of {method}" if method else f"the result for id {msg_id!r}"
            log.error("%s is not JSON (%s): %s; peer %s", of, culprit, exc, self.peer)
            data_: dict[str, Any] = {"reason": str(exc), "type": culprit}
            if method:
                data_["method"] = method
            return encode(
                ErrorResponse(
                    msg_id,
                    ek.INTERNAL_ERROR,
                    f"Internal error: {of} is not JSON ({culprit})",
                    data_,
                )
            )
        if len(data) > self.limits.max_frame + 1:
            return encode(self.too_large(message, len(data) - 1))
        return data

    def too_large(self, message: Message, size: int) -> ErrorResponse:
        """The error that replaces a reply of ``size`` bytes that does not fit a frame."""
        self.stats.count_error(ek.INTERNAL_ERROR)
        return reply_too_large(
            getattr(message, "id", None),
            size,
            self.limits.max_frame,
            getattr(message, "replayed", False),
        )

    def notify(self, method: str, params: Any) -> None:
        """Send a server-to-client notification. ``rpc.progress`` is opt-in: only to a peer
        that subscribed to it, so a client reading one line per request gets its reply."""
        if self.closed or (method == "rpc.progress" and method not in self.subscriptions):
            return
        self.stats.notifications_total += 1
        self.notified += 1
        self.send(encode(Notification(method, params)))

    def notify_soon(self, method: str, params: Any) -> None:
        """:meth:`notify` from any thread (through the loop)."""
        self.core.call_soon(self.notify, method, params)

    # -- end ----------------------------------------------------------------------------------
    def half_close(self) -> bool:
        """The peer sends no more: hang up after the last reply. True if calls remain."""
        self.draining = True
        return bool(self.calls)

    def close(self) -> None:
        """The peer is gone: nobody can receive a reply. The calls in flight are told to stop
        (their work may finish; its outcome is dropped). Idempotent."""
        self.closed = True
        self.core.sessions.discard(self)
        for call in list(self.calls.values()):
            call.mark_cancelled()
        if self.callback is not None:
            self.callback.close()


def _no_hangup(reason: str) -> None:
    pass


_JSON_SCALARS = (str, int, bool, type(None))


def _not_json(value: Any, depth: int = 0) -> str:
    """What in ``value`` has no JSON form: a type name (``set``, ``bytes``, ``float nan``), or
    the type of ``value`` itself when nothing (within 64 levels) is found."""
    if depth > 64:  # e.g. a list that contains itself
        return f"{type(value).__name__} nested too deep or circular"
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"float {value!r}"
    if isinstance(value, _JSON_SCALARS):
        return ""
    if isinstance(value, dict):
        items = [*value.values(), *value.keys()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return type(value).__name__
    for item in items:
        found = _not_json(item, depth + 1)
        if found:
            return found
    return "" if depth else type(value).__name__
