"""The command server: JSON-RPC 2.0 over TCP lines, one asyncio I/O thread, a bounded worker pool.

>>> from controller import CommandServer, Client
>>> with CommandServer(port=0) as server:
...     @server.command("subtract")
...     def subtract(minuend, subtrahend):
...         return minuend - subtrahend
...     with Client(server.address) as client:
...         client.call("subtract", [42, 23])
19

Contracts:

- The I/O thread never runs a blocking handler: plain functions run on the worker pool, ``async
  def`` handlers run as tasks on the loop (they must not block).
- Every request gets exactly one reply: its result, its error, the timeout error, the cancelled
  error, or (on ``stop()`` after the grace period) the cancelled error. Later outcomes of the
  same request are dropped and counted in ``rpc.stats`` as ``late_outcomes``.
- Every queue and buffer is bounded (:class:`Limits`); beyond a bound the request gets the busy
  error at once, or the connection is closed with a reason.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import ssl as ssl_module
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from statemachines import errorkinds as ek

from . import auth
from .errors import (
    BusyError,
    CancelledError,
    CommandTimeoutError,
    DeviceFaultError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    RpcError,
    UnauthorizedError,
)
from .protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    DEFAULT_PORT,
    Batch,
    Decoder,
    ErrorResponse,
    Event,
    Invalid,
    Message,
    Notification,
    Request,
    Response,
    encode,
)
from .workers import PoolFull, WorkerPool

log = logging.getLogger("statelink.server")

#: seconds stop() waits, after the grace, for cancelled device handlers to return
SETTLE_AT_STOP = 1.0

_FLUSH_AT = 64 * 1024  #: bytes of replies queued on a connection before they are flushed at once

PROTOCOL_VERSION = "1.0"


@dataclass
class Limits:
    """Every bound the server enforces; each has a documented default (docs/reliability.md)."""

    max_connections: int = 1024
    max_inflight: int = 256  #: requests in flight on one connection
    max_queue: int = 1024  #: jobs waiting for a worker thread
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = DEFAULT_MAX_BATCH
    max_depth: int = DEFAULT_MAX_DEPTH
    idle_timeout: float = 300.0  #: seconds without traffic or work before a connection is closed
    handshake_timeout: float = 10.0  #: seconds to authenticate, when a secret is set
    frame_timeout: float = 30.0  #: seconds to finish a line once its first byte arrived
    max_outgoing: int = 4 << 20  #: bytes queued to a client that does not read, then close
    max_auth_failures: int = 3
    max_subscriptions: int = 64


class Dispatch(Protocol):
    """What the server calls for one registered method (on the loop thread)."""

    def start(self, call: Call) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class Call:
    """One request in flight on the server. All methods run on the loop thread.

    The first of :meth:`resolve` / :meth:`reject` answers; every later one is dropped.
    """

    __slots__ = (
        "batch",
        "cancel_event",
        "cancelled",
        "conn",
        "done",
        "id",
        "is_notification",
        "method",
        "on_cancel",
        "on_timeout",
        "params",
        "timer",
    )

    def __init__(self, conn: Connection, msg: Request | Notification, batch: _BatchReply | None):
        self.conn = conn
        self.method = msg.method
        self.params = msg.params
        self.is_notification = isinstance(msg, Notification)
        self.id = None if self.is_notification else msg.id  # type: ignore[union-attr]
        self.batch = batch
        self.done = False
        self.cancelled = False
        self.timer: dict[Call, float] | None = None  #: its group in server.deadlines
        self.cancel_event: threading.Event | None = None
        self.on_cancel: Callable[[], bool] | None = None
        self.on_timeout: Callable[[], object] | None = None

    @property
    def server(self) -> CommandServer:
        return self.conn.server

    def resolve(self, result: Any) -> None:
        if self._finish():
            self.conn.reply(self, Response(self.id, result))

    def reject(self, error: RpcError) -> None:
        if self._finish():
            self.conn.server.stats.count_error(error.code)
            self.conn.reply(self, ErrorResponse(self.id, error.code, error.message, error.data))

    def settle(self, result: Any, exc: BaseException | None) -> None:
        """Answer from a handler outcome: a result, an :class:`RpcError`, or any exception."""
        if exc is None:
            self.resolve(result)
        elif isinstance(exc, RpcError):
            self.reject(exc)
        else:
            self.reject(handler_fault(self.method, exc))

    def _finish(self) -> bool:
        if self.done:
            self.conn.server.stats.late_outcomes += 1
            return False
        self.done = True
        if self.timer is not None:
            self.timer.pop(self, None)
        self.conn.forget(self)
        return True

    def arm_timeout(self, seconds: float) -> None:
        """Answer with the timeout error if still pending after ``seconds`` (never earlier;
        at most 1 ms, or 0.1 % of a timeout over 1 s, later: see :class:`_Deadlines`)."""
        if seconds and seconds > 0 and not self.done:
            self.timer = self.conn.server.deadlines.add(self, seconds)

    def _expire(self, seconds: float) -> None:
        if self.done:
            return
        if self.cancel_event is not None:
            self.cancel_event.set()
        hook, self.on_timeout = self.on_timeout, None
        if hook is not None:
            hook()
        if self.cancelled:
            self.reject(CancelledError(f"{self.method} was cancelled", {"id": self.id}))
        else:
            self.reject(
                CommandTimeoutError(
                    f"{self.method} did not finish within its timeout of {seconds:g} s",
                    {"timeout": seconds, "method": self.method},
                )
            )

    def cancel(self) -> None:
        """Ask the running command to stop (``rpc.cancel``).

        Without an ``on_cancel`` hook the call is answered with the cancelled error at once;
        a hook that returns True answers later itself (a device command answers once its
        handler has returned and the device state is settled).
        """
        if self.done:
            return
        self.cancelled = True
        if self.cancel_event is not None:
            self.cancel_event.set()
        if self.on_cancel is None or not self.on_cancel():
            self.reject(CancelledError(f"{self.method} was cancelled", {"id": self.id}))

    def progress(self, fraction: float, message: str = "") -> None:
        """Send ``rpc.progress`` to the requesting client. Thread-safe."""
        if self.is_notification:
            return
        params = {"id": self.id, "progress": fraction, "message": message}
        self.conn.server.call_soon(self.conn.notify, "rpc.progress", params)


class _Deadlines:
    """Request timeouts grouped by deadline: one loop timer per group, not one per request.

    A deadline is rounded *up* to a step of 1 ms per whole second of timeout (at least 1 ms), so
    a request times out at most 1 ms (or 0.1 % of a timeout over 1 s) after its exact deadline,
    never before, and one timeout value has at most ~1000 groups at a time. An answered call
    leaves its group at once (no reference to it is kept). Loop thread only.
    """

    __slots__ = ("groups", "server")

    def __init__(self, server: CommandServer) -> None:
        self.server = server
        self.groups: dict[int, dict[Call, float]] = {}  #: deadline in ms -> {call: timeout}

    def add(self, call: Call, seconds: float) -> dict[Call, float]:
        loop = self.server.loop
        step = int(seconds) or 1
        key = (int((loop.time() + seconds) * 1000) // step + 1) * step
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {}
            loop.call_at(key / 1000, self._expire, key)
        group[call] = seconds
        return group

    def _expire(self, key: int) -> None:
        for call, seconds in list(self.groups.pop(key, {}).items()):
            call._expire(seconds)


def handler_fault(method: str, exc: BaseException) -> DeviceFaultError:
    """The client-facing error for a handler that raised: type and message, no traceback."""
    log.error("handler of %s raised", method, exc_info=exc)
    return DeviceFaultError(
        f"{method} failed: {type(exc).__name__}: {exc}",
        {"exception": type(exc).__name__, "message": str(exc)},
    )


def bind_params(signature: inspect.Signature, params: Any) -> inspect.BoundArguments:
    """Bind JSON-RPC params to a signature: arrays positionally, objects by name."""
    try:
        if params is None:
            return signature.bind()
        if isinstance(params, list):
            return signature.bind(*params)
        return signature.bind(**params)
    except TypeError as exc:
        raise InvalidParamsError(f"Invalid params: {exc}", {"reason": str(exc)})


_P = inspect.Parameter


class _Binder:
    """:func:`bind_params` without ``inspect``'s general machinery for the usual handler
    signature (no ``*args``, ``**kwargs`` or positional-only parameters): the same checks and the
    same ``args``/``kwargs`` split as ``BoundArguments``. Anything else, and every params that
    would not bind, goes through :func:`bind_params` (so the errors are the same)."""

    __slots__ = (
        "kwonly_required",
        "min_args",
        "names",
        "order",
        "positional",
        "required",
        "signature",
        "simple",
    )

    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        ps = list(signature.parameters.values())
        self.simple = all(p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY) for p in ps)
        self.order = tuple(p.name for p in ps)  # positional-or-keyword first, then keyword-only
        self.positional = tuple(p.name for p in ps if p.kind is _P.POSITIONAL_OR_KEYWORD)
        self.names = frozenset(self.order)
        self.required = frozenset(p.name for p in ps if p.default is _P.empty)
        self.min_args = sum(
            1 for p in ps if p.kind is _P.POSITIONAL_OR_KEYWORD and p.default is _P.empty
        )
        self.kwonly_required = any(p.kind is _P.KEYWORD_ONLY and p.default is _P.empty for p in ps)

    def bind(self, params: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` for the handler; raises :class:`InvalidParamsError`."""
        if self.simple:
            if params is None:
                if not self.required:
                    return (), {}
            elif type(params) is list:
                if (
                    self.min_args <= len(params) <= len(self.positional)
                    and not self.kwonly_required
                ):
                    return tuple(params), {}
            elif type(params) is dict:
                keys = params.keys()
                if keys <= self.names and self.required <= keys:
                    args = []
                    for name in self.positional:
                        if name not in params:
                            break
                        args.append(params[name])
                    if len(args) == len(params):
                        return tuple(args), {}
                    return tuple(args), {
                        n: params[n] for n in self.order[len(args) :] if n in params
                    }
        bound = bind_params(self.signature, params)
        return bound.args, bound.kwargs


class FunctionCommand:
    """A command backed by a plain function (worker pool) or an ``async def`` (loop task)."""

    def __init__(
        self,
        server: CommandServer,
        name: str,
        func: Callable[..., Any],
        timeout: float | None,
        description: str | None,
    ):
        self.server = server
        self.name = name
        self.func = func
        self.timeout = timeout
        self.description = description or inspect.getdoc(func) or ""
        self.signature = inspect.signature(func)
        self.binder = _Binder(self.signature)
        self.is_async = inspect.iscoroutinefunction(func)

    def start(self, call: Call) -> None:
        try:
            args, kwargs = self.binder.bind(call.params)
        except RpcError as exc:
            call.reject(exc)
            return
        server = self.server
        if self.is_async:
            task = server.loop.create_task(_run_async(call, self.func(*args, **kwargs)))
            call.on_timeout = task.cancel
            call.on_cancel = lambda: bool(task.cancel()) and False
        else:
            try:
                server.pool.submit(self.func, args, kwargs, call.settle)
            except PoolFull as exc:
                call.reject(BusyError(f"server busy: {exc}", {"retry": True}))
                return
        call.arm_timeout(self.timeout if self.timeout is not None else server.default_timeout)

    def describe(self) -> dict[str, Any]:
        params = [
            {"name": p.name, "required": p.default is inspect.Parameter.empty}
            for p in self.signature.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        return {
            "name": self.name,
            "description": self.description,
            "params": params,
            "timeout": self.timeout or self.server.default_timeout,
        }


async def _run_async(call: Call, coro: Any) -> None:
    """Run an ``async def`` handler and answer from inside its task (no done-callback hop)."""
    try:
        result = await coro
    except asyncio.CancelledError:
        raise  # cancelled by the timeout or rpc.cancel, which answered already
    except BaseException as exc:
        call.settle(None, exc)
        if not isinstance(exc, Exception):
            # SystemExit/KeyboardInterrupt: out of the loop as before (start() serves on), but
            # raised by a plain callback, not by the task (which would log it as unretrieved)
            call.conn.server.loop.call_soon(_reraise, exc)
    else:
        call.settle(result, None)


def _reraise(exc: BaseException) -> None:
    raise exc


class _BatchReply:
    """Collects the replies of one batch and sends them as one array when all are answered."""

    __slots__ = ("conn", "remaining", "replies")

    def __init__(self, conn: Connection, size: int):
        self.conn = conn
        self.remaining = size
        self.replies: list[Message] = []

    def add(self, reply: Message | None) -> None:
        if reply is not None:
            self.replies.append(reply)
        self.remaining -= 1
        if self.remaining == 0 and self.replies:
            parts = [self.conn.encode_reply(reply)[:-1] for reply in self.replies]
            self.conn.write(b"[" + b",".join(parts) + b"]\n")


class Stats:
    """Counters for ``rpc.stats``. Loop thread only."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.requests_total = 0
        self.replies_total = 0
        self.notifications_total = 0
        self.late_outcomes = 0
        self.errors_by_code: dict[int, int] = {}
        self.closed_by_reason: dict[str, int] = {}

    def count_error(self, code: int) -> None:
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1

    def count_close(self, reason: str) -> None:
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1


#: bytes one read may take (as asyncio's own transports read)
RECV_SIZE = 256 * 1024


class Connection(asyncio.BufferedProtocol):
    """One client connection: decode, dispatch, answer, in the I/O thread.

    Reads land in the server's one receive buffer (:meth:`get_buffer`), shared by every
    connection: the loop thread consumes each read in :meth:`buffer_updated` before the next.
    A plain ``Protocol`` gets a new ``bytes`` of 256 KiB per read instead, which glibc serves
    with mmap/munmap until something in the process happens to raise its mmap threshold:
    15-18 us per read on the benchmark machine, as much as the rest of a request
    (docs/performance.md).
    """

    def __init__(self, server: CommandServer):
        self.server = server
        limits = server.limits
        self.decoder = Decoder(limits.max_frame, limits.max_depth, limits.max_batch)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self.calls: dict[Any, Call] = {}
        self.inflight = 0
        self.subscriptions: set[str] = set()
        self.authenticated = server.secret is None
        self.auth_failures = 0
        self.challenge: str | None = None
        self.client_nonce = ""
        self.client_name = ""
        self.connected_at = self.last_activity = time.monotonic()
        self.partial_since: float | None = None  #: when the unfinished line in the buffer began
        self.closing = False
        self.eof = False  #: the peer half-closed (sent EOF)
        self.callback: CallbackLink | None = None
        self.callback_port: int | None = None  #: asked for in rpc.hello; linked once authenticated
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        server = self.server
        if len(server.connections) >= server.limits.max_connections:
            server.stats.count_close("max_connections")
            transport.write(
                encode(
                    ErrorResponse(
                        None,
                        ek.BUSY,
                        f"too many connections (limit {server.limits.max_connections}); "
                        "try again later",
                        {"max_connections": server.limits.max_connections},
                    )
                )
            )
            self.closing = True
            transport.close()
            return
        server.connections.add(self)
        server.stats.connections_total += 1
        transport.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            # Nobody can receive the reply; let the work finish, then drop its outcome.
            call.cancelled = True
            if call.cancel_event is not None:
                call.cancel_event.set()
        if self.callback is not None:
            self.callback.close()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.recv_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.recv_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = now = time.monotonic()
        decoder = self.decoder
        for event in decoder.feed(data):
            self.handle(event, None)
            if self.closing:
                return
        # A started line must be finished within frame_timeout: a client trickling bytes
        # (slow-loris) cannot hold its slot and an unfinished frame forever.
        if not decoder.buffered:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = now

    def eof_received(self) -> bool:
        # Half-close: keep the connection until the in-flight replies are written.
        self.eof = True
        self._flush()  # replies already queued go out before the transport closes
        return bool(self.calls)

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, event: Event, batch: _BatchReply | None) -> None:
        if isinstance(event, (Request, Notification)):
            self.start_call(event, batch)
        elif isinstance(event, Batch):
            reply = _BatchReply(self, len(event.items))
            for item in event.items:
                self.handle(item, reply)
        elif isinstance(event, Invalid):
            self.server.stats.count_error(event.code)
            if batch is not None:
                batch.add(event.response())
            else:
                self.write(self.encode_reply(event.response()))
            if event.fatal:
                self.close("frame_limit")
        else:  # a response sent to the server: not a request
            invalid = Invalid(
                ek.INVALID_REQUEST,
                "Invalid Request",
                event.id,
                data={"reason": "the server does not take responses"},
            )
            self.handle(invalid, batch)

    def start_call(self, msg: Request | Notification, batch: _BatchReply | None) -> None:
        server = self.server
        server.stats.requests_total += 1
        call = Call(self, msg, batch)
        self.inflight += 1
        server.inflight += 1
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
        if server.stopping:
            call.reject(BusyError("server is shutting down", {"retry": True}))
            return
        if self.inflight > server.limits.max_inflight:
            call.reject(
                BusyError(
                    f"too many requests in flight on this connection (limit "
                    f"{server.limits.max_inflight}); wait for replies",
                    {"max_inflight": server.limits.max_inflight, "retry": True},
                )
            )
            return
        entry = server.methods.get(method)
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
        self.auth_failures += 1
        call.reject(UnauthorizedError(message, {"auth": "hmac-sha256"}))
        if self.auth_failures >= self.server.limits.max_auth_failures:
            self.close("auth_failures")

    def forget(self, call: Call) -> None:
        """Bookkeeping when a call is answered."""
        self.inflight -= 1
        server = self.server
        server.inflight -= 1
        if not call.is_notification:
            calls = self.calls
            if calls.get(call.id) is call:
                del calls[call.id]
            elif call.id is None:  # a null id that was in flight twice (see start_call)
                calls.pop(call, None)
        if server.inflight == 0 and server.drained is not None:
            server.drained.set()
        if self.eof and not self.calls:
            # The peer half-closed and this was its last reply: close once it is written
            # (scheduled, so the reply queued right after this is flushed first).
            server.loop.call_soon(self.close, "eof")

    # -- output -----------------------------------------------------------------------------
    def reply(self, call: Call, message: Message) -> None:
        self.server.stats.replies_total += 0 if call.is_notification else 1
        if call.batch is not None:
            call.batch.add(None if call.is_notification else message)
            return
        if call.is_notification:
            return
        data = self.encode_reply(message)
        # rpc.hello is answered on the request connection: the client reads that reply there
        # (its handshake runs before any callback delivery can be relied on).
        if self.callback is not None and self.callback.usable and call.method != "rpc.hello":
            self.callback.write(data)
        else:
            self.write(data)

    def encode_reply(self, message: Message) -> bytes:
        """Encode one reply; a result that is not JSON becomes an internal error for its id."""
        try:
            return encode(message)
        except (TypeError, ValueError) as exc:
            self.server.stats.count_error(ek.INTERNAL_ERROR)
            msg_id = getattr(message, "id", None)
            if isinstance(msg_id, float) and not math.isfinite(msg_id):
                msg_id = None  # e.g. "id": 1e400 decodes to inf, which has no JSON form
            return encode(
                ErrorResponse(
                    msg_id,
                    ek.INTERNAL_ERROR,
                    "Internal error: the result is not JSON",
                    {"reason": str(exc)},
                )
            )

    def notify(self, method: str, params: Any) -> None:
        """Send a server-to-client notification (loop thread)."""
        if self.closing:
            return
        self.server.stats.notifications_total += 1
        self.write(encode(Notification(method, params)))

    def write(self, data: bytes) -> None:
        if self.closing or self.transport is None:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _FLUSH_AT:
            # Many (or big) replies in one loop iteration: hand them to the transport now, so
            # that max_outgoing is checked before more pile up here.
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.server.flush_soon(self)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        transport = self.transport
        if self.closing or transport is None or not out:
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if transport.get_write_buffer_size() > self.server.limits.max_outgoing:
            self.overflow()

    def overflow(self) -> None:
        """The peer does not read its replies (here or on its callback link): drop it."""
        if self.closing:
            return
        log.warning("closing %s:%s: it does not read its replies", *self.peer)
        self.server.stats.count_close("outgoing_buffer")
        self.closing = True
        self._out.clear()
        self._out_bytes = 0
        if self.callback is not None:
            self.callback.close(abort=True)
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """Close after flushing what is queued."""
        if self.closing:
            return
        self.server.stats.count_close(reason)
        self._flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class CallbackLink:
    """Replies delivered by connecting back to the requesting peer's own address.

    Each reply goes exactly one way: over the link while it is usable, else on the request
    connection (:meth:`Connection.write`). The link becomes unusable when it cannot connect, when
    the peer closes it (EOF) or it fails (reset, write error: :class:`_CallbackProtocol`), and
    when :meth:`close` ends it; replies still waiting for the link to connect then go to the
    request connection. A reply already handed to a link's socket when the peer closed it is
    lost with it (TCP gives no receipt), which the client's own timeout covers.
    """

    def __init__(self, conn: Connection, port: int):
        self.conn = conn
        self.host = conn.peer[0]  # never any other host
        self.port = port
        self.usable = True
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._connecting = False

    def write(self, data: bytes) -> None:
        if not self.usable:
            self.conn.write(data)
            return
        limit = self.conn.server.limits.max_outgoing
        transport = self._transport
        if transport is not None:
            transport.write(data)
            if transport.get_write_buffer_size() > limit:
                self.conn.overflow()
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > limit:
            self.conn.overflow()
            return
        if not self._connecting:
            self._connecting = True
            self.conn.server.loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self.conn.server.loop
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _CallbackProtocol(self), self.host, self.port),
                timeout=5.0,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self.lost(f"cannot connect: {exc}")
            return
        except asyncio.CancelledError:  # the server stops: what waits goes the other way
            self.close()
            raise
        assert isinstance(transport, asyncio.Transport)
        if not self.usable:  # closed (or lost) while connecting
            transport.close()
            return
        self._transport = transport
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        if pending:
            transport.write(b"".join(pending))
            if transport.get_write_buffer_size() > self.conn.server.limits.max_outgoing:
                self.conn.overflow()

    def lost(self, reason: str) -> None:
        """The link failed or the peer closed it: reply on the request connection from now on."""
        if not self.usable:
            return  # closed by us, or already lost
        if not self.conn.closing:
            log.warning(
                "callback delivery to %s:%s failed (%s); replying on the request connection "
                "instead",
                self.host,
                self.port,
                reason,
            )
        self.close()

    def close(self, abort: bool = False) -> None:
        """End the link (the request connection closes, or rpc.hello moves it). Replies still
        waiting for it to connect go to the request connection (if that is still open); what
        the link's socket holds is flushed, unless ``abort``."""
        self.usable = False
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        for data in pending:
            self.conn.write(data)
        transport, self._transport = self._transport, None
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()


class _CallbackProtocol(asyncio.Protocol):
    """The server's end of a callback link: it only writes; it reads to see the link end."""

    def __init__(self, link: CallbackLink):
        self.link = link

    def data_received(self, data: bytes) -> None:
        pass  # the peer has nothing to say on this link; whatever it sends is dropped

    def eof_received(self) -> bool:
        self.link.lost("the peer closed the callback connection")
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(f"{type(exc).__name__}: {exc}" if exc else "the connection closed")


class CommandServer:
    """A JSON-RPC 2.0 command server; see the module docstring for the contracts.

    ``host`` defaults to loopback; ``port=0`` picks a free port (read it from ``address``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        workers: int = 8,
        timeout: float = 30.0,
        grace: float = 5.0,
        limits: Limits | None = None,
        secret: bytes | str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        name: str = "statelink",
    ) -> None:
        self.host = host
        self.port = port
        self.workers = workers
        self.default_timeout = timeout
        self.grace = grace
        self.limits = limits or Limits()
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.ssl = ssl
        self.name = name
        self.methods: dict[str, Dispatch] = {}
        self.connections: set[Connection] = set()
        self.deadlines = _Deadlines(self)
        self._to_flush: list[Connection] = []
        #: where every connection's reads land (loop thread only; see Connection)
        self.recv_buffer = memoryview(bytearray(RECV_SIZE))
        self.stats = Stats()
        self.inflight = 0
        self.stopping = False
        self.drained: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pool: WorkerPool = None  # type: ignore[assignment]
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._address: tuple[str, int] | None = None
        self._started_at = 0.0
        #: run by start() before the I/O thread starts, and by stop() after it ended
        self._on_start: list[Callable[[], None]] = []
        self._on_stop: list[Callable[[], None]] = []
        self.devices: dict[str, Any] = {}
        self._install_builtins()

    # -- registration -----------------------------------------------------------------------
    def command(
        self,
        name: str | None = None,
        *,
        timeout: float | None = None,
        description: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a handler under ``name`` (default: the function's name)."""

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add_command(name or func.__name__, func, timeout=timeout, description=description)
            return func

        return register

    def add_command(
        self,
        name: str,
        func: Callable[..., Any],
        *,
        timeout: float | None = None,
        description: str | None = None,
    ) -> None:
        """Register ``func`` as the handler of ``name``. Names under ``rpc.`` are reserved."""
        if name.startswith("rpc."):
            raise ValueError(f"method names starting with 'rpc.' are reserved: {name!r}")
        self.register(name, FunctionCommand(self, name, func, timeout, description))

    def register(self, name: str, dispatch: Dispatch) -> None:
        """Register a custom :class:`Dispatch` (used for devices)."""
        if name in self.methods:
            raise ValueError(f"method {name!r} is already registered")
        self.methods[name] = dispatch

    def add_device(self, spec: Any, *, simulate: bool = False) -> Any:
        """Serve a :class:`statemachines.device.DeviceSpec` (see :mod:`controller.devices`)."""
        from .devices import DeviceRuntime

        runtime = DeviceRuntime(self, spec, simulate=simulate)
        self.devices[spec.name] = runtime
        return runtime

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on; valid after :meth:`start`."""
        if self._address is None:
            raise RuntimeError("the server is not started; call start() first")
        return self._address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.stopping

    def start(self) -> CommandServer:
        """Start listening; returns once the socket accepts connections.

        A stopped server can be started again (on a new port when ``port`` is 0); it keeps its
        commands, devices and ``rpc.stats`` counters.

        Raises ``OSError`` with the reason when it cannot listen (e.g. the port is in use).
        """
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        for hook in self._on_start:  # before the I/O thread: no connection yet
            hook()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                while True:
                    try:
                        loop.run_forever()
                        break
                    except (SystemExit, KeyboardInterrupt) as exc:
                        # Raised by an ``async def`` handler: asyncio re-raises these out of the
                        # loop; its task already holds the exception (-> device fault reply).
                        log.error(
                            "a handler on the I/O thread raised %s; serving on", type(exc).__name__
                        )
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="statelink-io", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            exc = failure[0]
            if isinstance(exc, OSError):
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise OSError(
                    exc.errno, f"cannot listen on {self.host}:{self.port}: {reason}"
                ) from exc
            raise exc
        return self

    async def _listen(self) -> None:
        # A start() after stop(): nothing of the last run carries over but the registrations
        # and the rpc.stats counters (a connection or a notification the last run left
        # behind must not count here, and its drained event belongs to its closed loop).
        self.stopping = False
        self.drained = None
        self.connections = set()
        self.inflight = 0
        self.deadlines = _Deadlines(self)  # both belong to this loop: none left from an old one
        self._to_flush = []
        self.pool = WorkerPool(self.loop, self.workers, self.limits.max_queue)
        try:
            self._server = await self.loop.create_server(
                lambda: Connection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                backlog=1024,
                reuse_address=True,
                ssl_handshake_timeout=self.limits.handshake_timeout if self.ssl else None,
            )
        except BaseException:
            self.pool.shutdown()  # its threads would wait for jobs forever
            raise
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])
        self._started_at = time.monotonic()
        self.loop.create_task(self._sweep())
        log.info("listening on %s:%s%s", *self._address, " (TLS)" if self.ssl else "")

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: refuse new work, let in-flight commands finish for up to ``grace``
        seconds (they are answered), answer the rest with the cancelled error, close all."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        grace = self.grace if grace is None else grace
        future = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self.loop)
        try:
            future.result(timeout=grace + 10)
        except Exception:
            log.exception("shutdown did not complete cleanly")
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(timeout=10)
        self.pool.shutdown()
        for hook in self._on_stop:
            try:
                hook()
            except Exception:
                log.exception("stop hook failed")
        self._thread = None
        log.info("stopped")

    async def _shutdown(self, grace: float) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self.inflight:
            self.drained = asyncio.Event()
            try:
                await asyncio.wait_for(self.drained.wait(), timeout=grace)
            except asyncio.TimeoutError:
                pass
        # What is still in flight after the grace is cancelled: its handler is told (a device
        # command sees ctx.cancelled, and settles as cancelled, not faulted), the request is
        # answered with the cancelled error, and the jobs still waiting for a worker thread
        # are taken off the pool's queue, so they never run (their outcome is dropped as late).
        leftover = [call for conn in self.connections for call in conn.calls.values()]
        for call in leftover:
            call.cancelled = True
            if call.cancel_event is not None:
                call.cancel_event.set()
        for call in leftover:
            call.reject(
                CancelledError(
                    "the server stopped before the command finished", {"reason": "shutdown"}
                )
            )
        # Device handlers just cancelled get a moment (at most SETTLE_AT_STOP s) to return, so
        # that their device settles as cancelled, not faulted as "outcome unknown" at stop.
        settle_by = self.loop.time() + SETTLE_AT_STOP
        while any(d.busy for d in self.devices.values()) and self.loop.time() < settle_by:
            await asyncio.sleep(0.01)
        self.pool.shutdown(
            error=CancelledError(
                "the server stopped before the command started", {"reason": "shutdown"}
            )
        )
        for conn in list(self.connections):
            conn.close("shutdown")
        # Cancel what is left (async handlers, the sweeper), so that their ``finally`` blocks
        # run now rather than the tasks being destroyed pending when the loop closes.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        await asyncio.sleep(0)

    def __enter__(self) -> CommandServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def flush_soon(self, conn: Connection) -> None:
        """Flush ``conn`` in the next loop iteration: one callback for all the connections
        that got replies in this iteration, not one per connection. Loop thread only."""
        self._to_flush.append(conn)
        if len(self._to_flush) == 1:
            self.loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        conns, self._to_flush = self._to_flush, []
        for conn in conns:
            if conn._flush_scheduled:  # else flushed meanwhile (close, or _FLUSH_AT)
                try:
                    conn._flush()
                except Exception:  # one connection's failure must not stall the others
                    conn._flush_scheduled = False
                    log.exception("flushing replies to %s:%s failed", *conn.peer)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the I/O thread (thread-safe; dropped after stop)."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def publish(self, method: str, params: Any) -> None:
        """Send a notification to every connection subscribed to ``method`` (loop thread)."""
        for conn in self.connections:
            if method in conn.subscriptions:
                conn.notify(method, params)

    async def _sweep(self) -> None:
        limits = self.limits
        while not self.stopping:
            await asyncio.sleep(
                min(
                    1.0,
                    limits.idle_timeout / 4,
                    limits.handshake_timeout / 4,
                    limits.frame_timeout / 4,
                )
            )
            now = time.monotonic()
            for conn in list(self.connections):
                if not conn.authenticated and now - conn.connected_at > limits.handshake_timeout:
                    conn.close("handshake_timeout")
                elif (
                    conn.partial_since is not None
                    and now - conn.partial_since > limits.frame_timeout
                ):
                    conn.close("frame_timeout")
                elif not conn.calls and now - conn.last_activity > limits.idle_timeout:
                    conn.close("idle_timeout")

    # -- built-in methods -------------------------------------------------------------------
    def _install_builtins(self) -> None:
        builtins: dict[str, Callable[[Call], Any]] = {
            "rpc.ping": lambda call: "pong",
            "rpc.hello": self._rpc_hello,
            "rpc.discover": lambda call: self.discover(),
            "rpc.stats": lambda call: self.stats_snapshot(),
            "rpc.subscribe": self._rpc_subscribe,
            "rpc.unsubscribe": self._rpc_unsubscribe,
            "rpc.cancel": self._rpc_cancel,
        }
        for name, func in builtins.items():
            self.methods[name] = _Builtin(name, func)

    def _rpc_hello(self, call: Call) -> dict[str, Any]:
        params = call.params if isinstance(call.params, dict) else {}
        conn = call.conn
        if "client" in params:
            conn.client_name = str(params["client"])[:200]
        reply: dict[str, Any] = {
            "server": self.name,
            "protocol": PROTOCOL_VERSION,
            "auth": "hmac-sha256" if self.secret else None,
            "max_inflight": self.limits.max_inflight,
        }
        port = params.get("callback_port")
        if port is not None:
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise InvalidParamsError("callback_port must be a TCP port number (1-65535)")
            conn.callback_port = port
        if self.secret is not None and not conn.authenticated:
            response = params.get("response")
            if response is None:
                nonce = params.get("nonce", "")
                if not isinstance(nonce, str) or len(nonce) > auth.MAX_NONCE:
                    raise InvalidParamsError(
                        f"nonce must be a string of at most {auth.MAX_NONCE} characters"
                    )
                conn.challenge = auth.new_nonce()
                conn.client_nonce = nonce
                reply["challenge"] = conn.challenge
                reply["proof"] = auth.digest(self.secret, "server", conn.challenge, nonce)
            elif conn.challenge is not None and auth.verify(
                self.secret, "client", conn.challenge, conn.client_nonce, response
            ):
                conn.authenticated = True
            else:
                conn.challenge = None
                conn.auth_failures += 1
                log.warning(
                    "authentication failed from %s:%s (wrong secret or no challenge)", *conn.peer
                )
                if conn.auth_failures >= self.limits.max_auth_failures:
                    self.loop.call_soon(conn.close, "auth_failures")
                raise UnauthorizedError(
                    "authentication failed: wrong secret or no challenge; "
                    "call rpc.hello with a nonce first",
                    {"auth": "hmac-sha256"},
                )
        # The server connects back only for an authenticated peer, and only to its own address.
        if (
            conn.authenticated
            and conn.callback_port is not None
            and (
                conn.callback is None
                or not conn.callback.usable  # lost or never connected: try again
                or conn.callback.port != conn.callback_port
            )
        ):
            if conn.callback is not None:
                conn.callback.close()
            conn.callback = CallbackLink(conn, conn.callback_port)
        if conn.callback is not None:
            reply["callback"] = {"host": conn.callback.host, "port": conn.callback.port}
        reply["authenticated"] = conn.authenticated
        return reply

    def _rpc_subscribe(self, call: Call) -> dict[str, Any]:
        method = _method_param(call.params)
        subs = call.conn.subscriptions
        if method not in subs and len(subs) >= self.limits.max_subscriptions:
            raise BusyError(f"too many subscriptions (limit {self.limits.max_subscriptions})")
        subs.add(method)
        return {"subscribed": method}

    def _rpc_unsubscribe(self, call: Call) -> dict[str, Any]:
        method = _method_param(call.params)
        call.conn.subscriptions.discard(method)
        return {"unsubscribed": method}

    def _rpc_cancel(self, call: Call) -> dict[str, Any]:
        params = call.params
        if (
            not isinstance(params, dict)
            or "id" not in params
            or isinstance(params["id"], (list, dict))
        ):
            raise InvalidParamsError('rpc.cancel takes {"id": <id of the request to cancel>}')
        target = call.conn.calls.get(params["id"])
        if target is None or target is call:
            return {"cancelled": False, "reason": "no such request in flight on this connection"}
        target.cancel()
        return {"cancelled": True}

    def discover(self) -> dict[str, Any]:
        """An OpenRPC-style description of every method and device."""
        methods = [
            dict(entry.describe(), name=name) for name, entry in sorted(self.methods.items())
        ]
        return {
            "openrpc": "1.3.2",
            "info": {"title": self.name, "version": PROTOCOL_VERSION},
            "methods": methods,
            "devices": [runtime.spec.describe() for runtime in self.devices.values()],
        }

    def stats_snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "connections": len(self.connections),
            "connections_total": s.connections_total,
            "requests_in_flight": self.inflight,
            "requests_total": s.requests_total,
            "replies_total": s.replies_total,
            "notifications_total": s.notifications_total,
            "errors_by_code": {str(code): n for code, n in sorted(s.errors_by_code.items())},
            "closed_by_reason": dict(s.closed_by_reason),
            "late_outcomes": s.late_outcomes,
            "worker_queue": self.pool.pending if self.pool else 0,
            "workers": self.workers,
            "uptime": round(time.monotonic() - self._started_at, 3),
            "limits": asdict(self.limits),
        }


def _method_param(params: Any) -> str:
    method = (
        params.get("method")
        if isinstance(params, dict)
        else (params[0] if isinstance(params, list) and params else None)
    )
    if not isinstance(method, str) or not method:
        raise InvalidParamsError(
            'expected {"method": "<notification method>"}, e.g. {"method": "device.state"}'
        )
    return method


class _Builtin:
    """A built-in ``rpc.*`` method: cheap, answered on the I/O thread."""

    def __init__(self, name: str, func: Callable[[Call], Any]):
        self.name = name
        self.func = func

    def start(self, call: Call) -> None:
        call.resolve(self.func(call))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": _BUILTIN_DOCS.get(self.name, ""), "params": []}


_BUILTIN_DOCS = {
    "rpc.ping": 'Answers "pong". Liveness check.',
    "rpc.hello": "Handshake: {client, protocol, nonce, response, callback_port}.",
    "rpc.discover": "OpenRPC-style description of every method and device.",
    "rpc.stats": "Connections, requests in flight, totals and errors by code.",
    "rpc.subscribe": 'Receive a notification method, e.g. {"method": "device.state"}.',
    "rpc.unsubscribe": "Stop receiving a notification method.",
    "rpc.cancel": 'Cancel a request in flight on this connection: {"id": ...}.',
}
