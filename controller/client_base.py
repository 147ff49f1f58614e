"""What every client shares, whatever carries its bytes: request ids, the futures
(:class:`CommandFuture`), timeouts, late outcomes (:class:`LateOutcome`) and the one-outcome
rule. :class:`~controller.client.Client` (a TCP connection) and
:class:`~controller.mqtt.client.MqttClient` (a fleet node through a broker) subclass
:class:`BaseClient` and add only how a request goes out and how replies come back.

Contracts (both transports):

- ``send_command`` never blocks on the network reply; its future and its callback get exactly
  one outcome: the result, the server's error (a typed :class:`~controller.errors.RpcError`),
  :class:`~controller.errors.ClientTimeoutError` (a ``CommandTimeoutError``) after ``timeout``
  seconds, or a transport error (``ConnectionLostError``, ``NodeOfflineError``). Nothing stays
  pending forever.
- A reply that arrives after the client-side timeout goes to the request's ``on_late``
  (:class:`LateOutcome`); at most :data:`MAX_LATE` such requests are remembered per client (the
  oldest given up first, ``lost=True``), and a transport may bound how long one is awaited
  (:attr:`BaseClient.late_wait`).
- ``future.cancel()`` on a pending future means "I no longer care": the future is cancelled at
  once and the reply, when it comes, is dropped. :meth:`BaseClient.cancel` (``rpc.cancel``)
  stops the command on the server.
- Callbacks and handlers run on the transport's thread (reader, paho network thread) or the
  timer thread: keep them short.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeVar

from .client_reader import NO_ID, Undecodable
from .errors import ClientTimeoutError, ConnectionLostError, ParseError, RpcError, error_for
from .protocol import Batch, ErrorResponse, Notification, Request, Response, encode
from .scheduler import Scheduler, Timer

log = logging.getLogger("statelink.client")

Callback = Callable[["Future[Any]"], None]
Handler = Callable[[Any], None]

#: requests per client whose late outcome (after the client-side timeout) is still awaited;
#: beyond it the oldest is given up (its ``on_late`` gets ``lost=True``)
MAX_LATE = 1024


class CommandFuture(Future[Any]):
    """The future of :meth:`BaseClient.send_command`: ``request_id`` (for
    :meth:`BaseClient.cancel`), ``key`` (the idempotency key sent, or None) and ``replayed``
    (set before the outcome: True when the server answered with the stored outcome of an
    earlier execution of the same key instead of running the command)."""

    def __init__(self, request_id: Any, key: str | None) -> None:
        super().__init__()
        self.request_id = request_id
        self.key = key
        self.replayed = False


@dataclass(frozen=True, slots=True)
class LateOutcome:
    """The outcome of a request that came after its client-side timeout (``on_late``).

    ``result`` or ``error`` as for a future; ``lost`` True (and both None) when the client
    gave up waiting for it: the connection was lost, more than :data:`MAX_LATE` requests
    timed out on this client (the oldest is given up), or it waited ``late_wait`` seconds.
    """

    request_id: Any
    method: str
    key: str | None
    result: Any = None
    error: RpcError | None = None
    replayed: bool = False
    lost: bool = False


LateCallback = Callable[[LateOutcome], None]
_Self = TypeVar("_Self", bound="BaseClient")


def _resolve(future: Future[Any], result: Any, error: BaseException | None) -> None:
    """Give ``future`` its outcome, unless the user cancelled it (``future.cancel()``)
    meanwhile: then there is nobody to tell, and the reply is dropped. Never raises, so the
    thread that calls this survives."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        if not future.cancelled():  # cannot happen: each pending entry is popped once
            log.exception("outcome for a future that already has one")


class Pending:
    """One request awaiting its outcome. ``tag``: the transport's handle of it (the MQTT
    correlation data), released once the request is done for good."""

    __slots__ = ("future", "method", "on_late", "tag", "timer")

    def __init__(
        self,
        future: CommandFuture,
        method: str,
        on_late: LateCallback | None,
        tag: Any = None,
    ):
        self.future = future
        self.method = method
        self.timer: Timer | None = None
        self.on_late = on_late
        self.tag = tag


class BaseClient:
    """The request bookkeeping of a client; a transport subclass provides :meth:`_transmit`
    (and ``connect``, ``notify``, ``subscribe``, ``close``, ``connected``)."""

    #: seconds a timed-out request's late outcome is awaited (None: until the transport
    #: says it cannot come); then ``on_late`` gets ``lost=True``
    late_wait: float | None = None

    def __init__(self, *, name: str, scheduler: Scheduler | None, timers_name: str) -> None:
        self.name = name
        self.scheduler = scheduler or Scheduler(timers_name)
        self._own_scheduler = scheduler is None
        self._ids = itertools.count(1)
        self._pending: dict[Any, Pending] = {}
        #: timed-out requests whose outcome may still come (oldest first; at most MAX_LATE)
        self._late: OrderedDict[Any, Pending] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._subscribers: dict[str, list[Handler]] = {}
        self._connection_handlers: list[Callable[[bool], None]] = []
        self.server_info: dict[str, Any] = {}
        self.reconnects = 0

    # -- what a transport provides ----------------------------------------------------------
    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def _transmit(
        self, request_id: Any, entry: Pending, data: bytes, timeout: float
    ) -> RpcError | None:
        """Send one encoded request (already pending); the error to settle it with when it
        cannot go out, else None."""
        raise NotImplementedError

    def _new_tag(self, request_id: Any) -> Any:
        """The transport's handle of a new request (:attr:`Pending.tag`), made before it is
        pending; None by default."""
        return None

    def _release(self, entry: Pending) -> None:
        """A request is done for good (settled, given up, cancelled): drop its tag."""

    def _default_key(self, method: str) -> str | None:
        """The idempotency key of a request of ``method`` sent without one (None: no key)."""
        return None

    def connect(self) -> None:
        """Connect now (blocks); raises ``OSError`` or :class:`RpcError` when the server
        cannot be reached."""
        raise NotImplementedError

    def notify(self, method: str, params: Any = None) -> bool:
        """Send a notification (no reply, ever); False when it cannot go out."""
        raise NotImplementedError

    def subscribe(self, method: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(params)`` for each notification ``method`` of the server (blocks
        until the server sends them); returns an unsubscribe."""
        raise NotImplementedError

    def close(self) -> None:
        """Close; every pending request resolves (connection lost)."""
        raise NotImplementedError

    # -- calls ------------------------------------------------------------------------------
    def send_command(
        self,
        method: str,
        params: Any = None,
        callback: Callback | None = None,
        timeout: float = 5.0,
        *,
        key: str | None = None,
        on_late: LateCallback | None = None,
    ) -> CommandFuture:
        """Send a request; return at once. ``callback(future)`` runs once it is resolved.

        ``key``: the idempotency key (1-128 printable characters; see docs/protocol.md).
        ``on_late(LateOutcome)``: called (transport or timer thread; do not block) with the
        outcome of this request if it comes after the client-side timeout, or with
        ``lost=True`` when it never will (see :class:`LateOutcome`).

        ``future.cancel()`` works while the reply is pending ("I no longer care": the reply is
        dropped when it comes); it does not stop the command on the server, for that call
        :meth:`cancel` (``rpc.cancel``) as well.
        """
        if key is None:
            key = self._default_key(method)
        request_id = self._new_id()
        future = CommandFuture(request_id, key)
        future.add_done_callback(functools.partial(self._forget_if_cancelled, request_id))
        if callback is not None:
            future.add_done_callback(callback)
        try:
            data = encode(Request(method, params, request_id, key))
        except (TypeError, ValueError) as exc:
            future.set_exception(TypeError(f"params of {method} are not JSON: {exc}"))
            return future
        if self._closed.is_set():
            future.set_exception(ConnectionLostError("the client is closed", {"method": method}))
            return future
        pending = Pending(future, method, on_late, self._new_tag(request_id))
        with self._lock:  # pending first: a timer that fires at once must find it
            self._pending[request_id] = pending
        try:
            pending.timer = self.scheduler.call_later(timeout, self._expire, request_id, timeout)
        except RuntimeError:  # the scheduler is closed: close() is under way
            self._settle(
                request_id, None, ConnectionLostError("the client is closed", {"method": method})
            )
            return future
        if future.done():  # answered (or lost) before its timer existed
            pending.timer.cancel()
        error = self._transmit(request_id, pending, data, timeout)
        if error is not None:
            self._settle(request_id, None, error)
        return future

    def _new_id(self) -> Any:
        return next(self._ids)

    def cancel(self, future: Future[Any], timeout: float = 5.0) -> CommandFuture:
        """Ask the server to cancel the request behind ``future`` (``rpc.cancel``).

        The request itself is then answered with the cancelled error (or its result, if it
        finished first). Returns the future of the ``rpc.cancel`` call. (``future.cancel()``
        only stops waiting, locally; call both to stop the command and drop its reply.)
        """
        return self.send_command(
            "rpc.cancel",
            {"id": future.request_id},  # type: ignore[attr-defined]
            timeout=timeout,
        )

    def call(
        self, method: str, params: Any = None, timeout: float = 5.0, *, key: str | None = None
    ) -> Any:
        """Send a request and wait for its result; raise its typed error. (Whether the reply
        was replayed is on the future of :meth:`send_command`.)"""
        return self.send_command(method, params, timeout=timeout, key=key).result(
            timeout=timeout + 5.0
        )

    @property
    def pending(self) -> int:
        """Requests sent and not yet resolved."""
        return len(self._pending)

    # -- replies ----------------------------------------------------------------------------
    def handle_event(self, event: Any) -> None:
        """Route one decoded message from the server (transport thread)."""
        if isinstance(event, Response):
            self._settle(event.id, event.result, None, event.replayed)
        elif isinstance(event, ErrorResponse):
            if event.id is None and event.code not in (-32700, -32600):
                log.warning("server error without id: %s %s", event.code, event.message)
                return
            self._settle(
                event.id, None, error_for(event.code, event.message, event.data), event.replayed
            )
        elif isinstance(event, Undecodable):
            self._undecodable(event)
        elif isinstance(event, Notification):
            self._notify_subscribers(event.method, event.params)
        elif isinstance(event, Batch):
            for item in event.items:
                self.handle_event(item)

    def _add_handler(self, method: str, handler: Handler) -> bool:
        """Register ``handler`` for the notification ``method``; True when it is the first
        (the transport subscribes then)."""
        handlers = self._subscribers.setdefault(method, [])
        handlers.append(handler)
        return len(handlers) == 1

    def _remove_handler(self, method: str, handler: Handler) -> bool:
        """Unregister ``handler``; True when ``method`` has no handler left (the transport
        unsubscribes then)."""
        handlers = self._subscribers.get(method, [])
        if handler in handlers:
            handlers.remove(handler)
        if handlers:
            return False
        self._subscribers.pop(method, None)
        return True

    def _notify_subscribers(self, method: str, params: Any) -> None:
        for handler in self._subscribers.get(method, ()):
            try:
                handler(params)
            except Exception:
                log.exception("notification handler for %s failed", method)

    def _undecodable(self, event: Undecodable, request_id: Any = NO_ID) -> bool:
        """A reply that could not be decoded fails its request at once, saying why
        (``request_id``: the request it answers when the transport knows, else its id)."""
        if request_id is NO_ID:
            request_id = event.id
        if request_id is NO_ID:
            log.warning(
                "dropped a message from %s that cannot be decoded and names no request: %s",
                self._where(),
                event.reason,
            )
            return False
        with self._lock:
            pending = self._pending.get(request_id) or self._late.get(request_id)
        method = pending.method if pending is not None else "a request"
        error = ParseError(
            f"the reply to {method} (id {request_id!r}) cannot be decoded: {event.reason}",
            {**event.data, "reason": event.reason, "source": "client"},
        )
        return self._settle(request_id, None, error)

    def _where(self) -> str:
        """The server, for messages."""
        return str(getattr(self, "address", "?"))

    def _settle(
        self, request_id: Any, result: Any, error: RpcError | None, replayed: bool = False
    ) -> bool:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            late = self._late.pop(request_id, None) if pending is None else None
        if pending is None:
            if late is not None:
                self._release(late)
                self._call_late(late, request_id, result, error, replayed)
                return True
            # lost or cancelled by the user (or a late reply given up): exactly one outcome
            log.debug("dropped a reply to no pending request (id %r)", request_id)
            return False
        if pending.timer is not None:
            pending.timer.cancel()
        if pending.tag is not None:
            self._release(pending)
        pending.future.replayed = replayed
        _resolve(pending.future, result, error)
        return True

    def _call_late(
        self,
        entry: Pending,
        request_id: Any,
        result: Any,
        error: RpcError | None,
        replayed: bool = False,
        lost: bool = False,
    ) -> None:
        """Hand a late outcome to the request's ``on_late`` (transport/timer thread), always
        after the future's own outcome (the timeout) has been delivered to its callbacks."""
        outcome = LateOutcome(
            request_id, entry.method, entry.future.key, result, error, replayed, lost
        )
        on_late = entry.on_late
        if on_late is None:
            log.info("late outcome of %s (id %r) dropped", entry.method, request_id)
            return

        def deliver(_future: Future[Any]) -> None:
            try:
                on_late(outcome)
            except Exception:
                log.exception("late-outcome callback of %s failed", entry.method)

        # _expire files the request as late before it resolves the future: a reply in
        # between must not overtake the timeout (done-callbacks run in the order added)
        entry.future.add_done_callback(deliver)

    def _forget_if_cancelled(self, request_id: Any, future: Future[Any]) -> None:
        """Done-callback: a future the user cancelled is pending no more (its reply, if it
        comes, is dropped) and its timer is stopped."""
        if not future.cancelled():
            return
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.future is not future:
                return
            del self._pending[request_id]
        if pending.timer is not None:
            pending.timer.cancel()
        self._release(pending)

    def _expire(self, request_id: Any, timeout: float) -> None:
        given_up: list[tuple[Any, Pending]] = []
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is not None:  # its outcome may still come: remember it, bounded
                self._late[request_id] = pending
                while len(self._late) > MAX_LATE:
                    given_up.append(self._late.popitem(last=False))
        for old_id, old in given_up:
            self._release(old)
            self._call_late(old, old_id, None, None, lost=True)
        if pending is None:
            return
        if self.late_wait is not None:
            try:
                self.scheduler.call_later(self.late_wait, self._give_up, request_id, pending)
            except RuntimeError:  # closing: close() gives every late request up
                pass
        _resolve(
            pending.future,
            None,
            ClientTimeoutError(
                f"no reply to {pending.method} within {timeout:g} s",
                {"timeout": timeout, "method": pending.method, "source": "client"},
            ),
        )

    def _give_up(self, request_id: Any, entry: Pending) -> None:
        """``late_wait`` after its timeout: stop awaiting the request's late outcome."""
        with self._lock:
            if self._late.get(request_id) is not entry:
                return
            del self._late[request_id]
        self._release(entry)
        self._call_late(entry, request_id, None, None, lost=True)

    def _fail_all(
        self, error: Callable[[Any, Pending], RpcError], *, late_error: bool = False
    ) -> None:
        """Every pending request fails with ``error(request_id, entry)``; every late one is
        given up (``lost=True``) or, with ``late_error``, gets that error as its late
        outcome."""
        with self._lock:
            pending, self._pending = self._pending, {}
            late, self._late = self._late, OrderedDict()
        for request_id, entry in late.items():  # their replies can no longer come
            self._release(entry)
            if late_error:
                self._call_late(entry, request_id, None, error(request_id, entry))
            else:
                self._call_late(entry, request_id, None, None, lost=True)
        for request_id, entry in pending.items():
            if entry.timer is not None:
                entry.timer.cancel()
            self._release(entry)
            _resolve(entry.future, None, error(request_id, entry))

    # -- connection events ------------------------------------------------------------------
    def _emit_connection(self, up: bool) -> None:
        for handler in list(self._connection_handlers):
            try:
                handler(up)
            except Exception:
                log.exception("connection handler failed")

    def on_connection(self, handler: Callable[[bool], None]) -> None:
        """Call ``handler(True)`` after each reconnect and ``handler(False)`` on each loss."""
        self._connection_handlers.append(handler)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = [
    "MAX_LATE",
    "BaseClient",
    "Callback",
    "CommandFuture",
    "Handler",
    "LateCallback",
    "LateOutcome",
    "Pending",
]
