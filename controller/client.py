"""The client: one connection, one reader thread, calls that never block.

>>> from controller import CommandServer, Client
>>> with CommandServer(port=0) as server, Client(server.address) as client:
...     future = client.send_command("rpc.ping")
...     future.result(timeout=5)
'pong'

Contracts:

- ``send_command`` never blocks on the network reply; its future and its callback get exactly
  one outcome: the result, the server's error (a typed :class:`~controller.errors.RpcError`),
  :class:`~controller.errors.ClientTimeoutError` (a ``CommandTimeoutError``) after ``timeout``
  seconds, or
  :class:`~controller.errors.ConnectionLostError`. Nothing stays pending forever.
- ``send_command(..., key=KEY)`` sends an idempotency key: a device command with the same key
  runs at most once on its server (a retry joins the running execution or gets its stored
  outcome, then ``future.replayed`` is True). ``rpc.*`` methods ignore keys.
- A reply the client cannot decode (over the frame limit, nested too deep) is never dropped:
  the request with its id fails at once with a :class:`~controller.errors.ParseError` saying
  why. The limits are the server's (see :mod:`controller.client_reader`).
- A reply that arrives after the client-side timeout is not lost either: the request's
  ``on_late(LateOutcome)`` gets it (at most :data:`MAX_LATE` such requests are remembered per
  client, the oldest given up first).
- ``future.cancel()`` on a pending future means "I no longer care": the future is cancelled
  at once (its callback runs with the cancelled future) and the reply, when it comes, is
  dropped. It does not stop the command on the server; :meth:`Client.cancel` does that
  (``rpc.cancel``). The two can be combined.
- Callbacks and notification handlers run on the client's reader (or timer) thread: keep them
  short; hand work to another thread if it blocks.
- With a ``secret`` the client authenticates the server too: it refuses a server that does not
  run the challenge (``auth`` null) or cannot prove that it holds the same secret.
- With callback delivery (``callback_listener=``) request ids are strings
  ``"<prefix>.<n>"``: the prefix is random per client (128 bits), so clients that share a
  listener never see each other's replies, and a peer that connects to the listener cannot
  guess an id to inject a reply. Replies whose id matches no pending request are dropped.
- After a lost connection the client reconnects with backoff (unless ``reconnect=False``),
  authenticates again and renews its subscriptions.
"""

from __future__ import annotations

import functools
import itertools
import logging
import secrets
import socket
import ssl as ssl_module
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from statemachines.addresses import Address, parse_address

from .callback_listener import ID_SEPARATOR, CallbackListener
from .client_hello import hello
from .client_reader import NO_ID, ReplyReader, Undecodable, limits_of, read_events
from .errors import (
    ClientTimeoutError,
    ConnectionLostError,
    ParseError,
    RpcError,
    error_for,
)
from .protocol import (
    Batch,
    ErrorResponse,
    Notification,
    Request,
    Response,
    encode,
)
from .scheduler import Scheduler, Timer

log = logging.getLogger("statelink.client")

Callback = Callable[["Future[Any]"], None]
Handler = Callable[[Any], None]

#: requests per client whose late outcome (after the client-side timeout) is still awaited;
#: beyond it the oldest is given up (its ``on_late`` gets ``lost=True``)
MAX_LATE = 1024


class CommandFuture(Future[Any]):
    """The future of :meth:`Client.send_command`: ``request_id`` (for :meth:`Client.cancel`),
    ``key`` (the idempotency key sent, or None) and ``replayed`` (set before the outcome:
    True when the server answered with the stored outcome of an earlier execution of the
    same key instead of running the command)."""

    def __init__(self, request_id: Any, key: str | None) -> None:
        super().__init__()
        self.request_id = request_id
        self.key = key
        self.replayed = False


@dataclass(frozen=True, slots=True)
class LateOutcome:
    """The outcome of a request that came after its client-side timeout (``on_late``).

    ``result`` or ``error`` as for a future; ``lost`` True (and both None) when the client
    gave up waiting for it: the connection was lost, or more than :data:`MAX_LATE` requests
    timed out on this client (the oldest is given up).
    """

    request_id: Any
    method: str
    key: str | None
    result: Any = None
    error: RpcError | None = None
    replayed: bool = False
    lost: bool = False


LateCallback = Callable[[LateOutcome], None]


def _resolve(future: Future[Any], result: Any, error: BaseException | None) -> None:
    """Give ``future`` its outcome, unless the user cancelled it (``future.cancel()``)
    meanwhile: then there is nobody to tell, and the reply is dropped. Never raises, so the
    reader thread that calls this survives."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        if not future.cancelled():  # cannot happen: each pending entry is popped once
            log.exception("outcome for a future that already has one")


class _Pending:
    __slots__ = ("future", "method", "on_late", "timer")

    def __init__(
        self, future: CommandFuture, method: str, timer: Timer | None, on_late: LateCallback | None
    ):
        self.future = future
        self.method = method
        self.timer = timer
        self.on_late = on_late


class Client:
    """A thread-safe connection to one :class:`~controller.server.CommandServer`."""

    def __init__(
        self,
        address: str | Address,
        *,
        name: str = "statelink-client",
        connect_timeout: float = 5.0,
        secret: bytes | str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        scheduler: Scheduler | None = None,
        callback_listener: CallbackListener | None = None,
        write_timeout: float = 30.0,
        connect: bool = True,
    ) -> None:
        self.address = parse_address(address)
        self.name = name
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.scheduler = scheduler or Scheduler(f"statelink-client-timers-{self.address[1]}")
        self._own_scheduler = scheduler is None
        self.callback_listener = callback_listener
        #: random per client; request ids are ``f"{id_prefix}.{n}"`` with callback delivery
        self.id_prefix: str | None = (
            secrets.token_hex(16) if callback_listener is not None else None
        )
        self._ids = itertools.count(1)
        self._pending: dict[Any, _Pending] = {}
        #: timed-out requests whose outcome may still come (oldest first; at most MAX_LATE)
        self._late: OrderedDict[Any, _Pending] = OrderedDict()
        self._reply_reader = ReplyReader()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None
        self._subscribers: dict[str, list[Handler]] = {}
        self._connection_handlers: list[Callable[[bool], None]] = []
        self.server_info: dict[str, Any] = {}
        self.reconnects = 0
        if callback_listener is not None:
            callback_listener.attach(self)
        if connect:
            try:
                self.connect()
            except BaseException:
                if callback_listener is not None:
                    callback_listener.detach(self)
                raise

    # -- connection -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self) -> None:
        """Connect and handshake now; raises ``OSError`` (unreachable) or
        :class:`~controller.errors.UnauthorizedError` (wrong secret)."""
        self._open()
        self._reader = threading.Thread(
            target=self._read_forever, name="statelink-client-reader", daemon=True
        )
        self._reader.start()

    def _open(self) -> None:
        sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl is not None:
                sock = self.ssl.wrap_socket(
                    sock, server_hostname=self.server_hostname or self.address[0]
                )
            self.server_info = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        self._reply_reader = ReplyReader(*limits_of(self.server_info))
        sock.settimeout(self.write_timeout)  # bounds sendall; the reader treats it as idle
        self._sock = sock
        self._connected.set()

    def _handshake(self, sock: socket.socket) -> dict[str, Any]:
        """``rpc.hello`` (and authentication) before the reader thread starts."""
        return hello(
            sock,
            self.address,
            client=self.name,
            secret=self.secret,
            callback_port=(
                self.callback_listener.address[1] if self.callback_listener is not None else None
            ),
            ids=self._ids,
        )

    def _read_forever(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            sock = self._sock
            if sock is not None:
                self._read(sock)
                self._lost()
            if self._closed.is_set() or not self.reconnect:
                return
            if self._closed.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff)
            try:
                self._open()
            except OSError as exc:
                log.debug("reconnect to %s:%s failed: %s", *self.address, exc)
                continue
            except RpcError as exc:  # e.g. the server came back with another secret
                log.warning("reconnect to %s:%s refused: %s", *self.address, exc.message)
                continue
            if self._closed.is_set():  # close() ran while reconnecting: do not stay open
                self._connected.clear()
                new, self._sock = self._sock, None
                if new is not None:
                    new.close()
                return
            backoff = 0.05
            self.reconnects += 1
            log.info("reconnected to %s:%s", *self.address)
            self._resubscribe()
            self._emit_connection(True)

    def _read(self, sock: socket.socket) -> None:
        read_events(sock, self._closed, self.handle_event, self._reply_reader)

    def handle_event(self, event: Any) -> None:
        """Route one decoded message from the request connection (reader thread); the
        callback listener uses :meth:`deliver_reply`, which takes replies only."""
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
            for handler in self._subscribers.get(event.method, ()):
                try:
                    handler(event.params)
                except Exception:
                    log.exception("notification handler for %s failed", event.method)
        elif isinstance(event, Batch):
            for item in event.items:
                self.handle_event(item)

    def deliver_reply(self, event: Response | ErrorResponse | Undecodable) -> bool:
        """Settle the request whose id is exactly ``event.id`` (for the callback listener).
        False, and nothing done, when no request of this client has that id."""
        if isinstance(event, Response):
            return self._settle(event.id, event.result, None, event.replayed)
        if isinstance(event, Undecodable):
            return self._undecodable(event)
        return self._settle(
            event.id, None, error_for(event.code, event.message, event.data), event.replayed
        )

    def _undecodable(self, event: Undecodable) -> bool:
        """A reply that could not be decoded fails its request at once, saying why."""
        if event.id is NO_ID:
            log.warning(
                "dropped a message from %s:%s that cannot be decoded and names no request: %s",
                *self.address,
                event.reason,
            )
            return False
        with self._lock:
            pending = self._pending.get(event.id) or self._late.get(event.id)
        method = pending.method if pending is not None else "a request"
        error = ParseError(
            f"the reply to {method} (id {event.id!r}) cannot be decoded: {event.reason}",
            {**event.data, "reason": event.reason, "source": "client"},
        )
        return self._settle(event.id, None, error)

    def _settle(
        self, request_id: Any, result: Any, error: RpcError | None, replayed: bool = False
    ) -> bool:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            late = self._late.pop(request_id, None) if pending is None else None
        if pending is None:
            if late is not None:
                self._call_late(late, request_id, result, error, replayed)
                return True
            # lost or cancelled by the user (or a late reply given up): exactly one outcome
            log.debug("dropped a reply to no pending request (id %r)", request_id)
            return False
        if pending.timer is not None:
            pending.timer.cancel()
        pending.future.replayed = replayed
        _resolve(pending.future, result, error)
        return True

    def _call_late(
        self,
        entry: _Pending,
        request_id: Any,
        result: Any,
        error: RpcError | None,
        replayed: bool = False,
        lost: bool = False,
    ) -> None:
        """Hand a late outcome to the request's ``on_late`` (reader/timer thread), always
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

    def _lost(self) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        with self._lock:
            pending, self._pending = self._pending, {}
            late, self._late = self._late, OrderedDict()
        for request_id, entry in late.items():  # their replies can no longer come
            self._call_late(entry, request_id, None, None, lost=True)
        for request_id, entry in pending.items():
            if entry.timer is not None:
                entry.timer.cancel()
            _resolve(
                entry.future,
                None,
                ConnectionLostError(
                    f"connection to {self.address[0]}:{self.address[1]} lost before the reply to "
                    f"{entry.method} (id {request_id})",
                    {"method": entry.method},
                ),
            )
        if was_connected:
            self._emit_connection(False)

    def _emit_connection(self, up: bool) -> None:
        for handler in list(self._connection_handlers):
            try:
                handler(up)
            except Exception:
                log.exception("connection handler failed")

    def on_connection(self, handler: Callable[[bool], None]) -> None:
        """Call ``handler(True)`` after each reconnect and ``handler(False)`` on each loss."""
        self._connection_handlers.append(handler)

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
        ``on_late(LateOutcome)``: called (reader thread; do not block) with the outcome of
        this request if it comes after the client-side timeout, or with ``lost=True`` when
        it never will (see :class:`LateOutcome`).

        ``future.cancel()`` works while the reply is pending ("I no longer care": the reply is
        dropped when it comes); it does not stop the command on the server, for that call
        :meth:`cancel` (``rpc.cancel``) as well.
        """
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
        pending = _Pending(future, method, None, on_late)
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
        if not self._send(data):
            self._settle(
                request_id,
                None,
                ConnectionLostError(
                    f"not connected to {self.address[0]}:{self.address[1]}"
                    + (" (reconnecting)" if self.reconnect and not self._closed.is_set() else ""),
                    {"method": method},
                ),
            )
        return future

    def _new_id(self) -> int | str:
        number = next(self._ids)
        if self.id_prefix is None:
            return number
        return f"{self.id_prefix}{ID_SEPARATOR}{number}"

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

    def _expire(self, request_id: Any, timeout: float) -> None:
        given_up: list[tuple[Any, _Pending]] = []
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is not None:  # its outcome may still come: remember it, bounded
                self._late[request_id] = pending
                while len(self._late) > MAX_LATE:
                    given_up.append(self._late.popitem(last=False))
        for old_id, old in given_up:
            self._call_late(old, old_id, None, None, lost=True)
        if pending is not None:
            _resolve(
                pending.future,
                None,
                ClientTimeoutError(
                    f"no reply to {pending.method} within {timeout:g} s",
                    {"timeout": timeout, "method": pending.method, "source": "client"},
                ),
            )

    def _send(self, data: bytes) -> bool:
        sock = self._sock
        if sock is None or not self._connected.is_set():
            return False
        try:
            with self._send_lock:
                sock.sendall(data)
        except OSError:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wake the reader: it resolves everything
            except OSError:
                pass
            return True  # the pending entry is resolved by _lost()
        return True

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

    def notify(self, method: str, params: Any = None) -> bool:
        """Send a notification (no reply, ever). Returns False when not connected."""
        return self._send(encode(Notification(method, params)))

    def subscribe(self, method: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(params)`` for each notification ``method``; also asks the server to
        send it (``rpc.subscribe``), again after each reconnect. Returns an unsubscribe."""
        first = method not in self._subscribers
        self._subscribers.setdefault(method, []).append(handler)
        if first and self.connected:
            self.call("rpc.subscribe", {"method": method}, timeout=self.connect_timeout)

        def unsubscribe() -> None:
            handlers = self._subscribers.get(method, [])
            if handler in handlers:
                handlers.remove(handler)
            if not handlers:
                self._subscribers.pop(method, None)
                if self.connected:
                    self.send_command("rpc.unsubscribe", {"method": method})

        return unsubscribe

    def _resubscribe(self) -> None:
        for method in list(self._subscribers):
            self.send_command("rpc.subscribe", {"method": method})

    @property
    def pending(self) -> int:
        """Requests sent and not yet resolved."""
        return len(self._pending)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection; every pending request resolves with connection-lost."""
        self._closed.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=5)
        self._lost()
        if self.callback_listener is not None:
            self.callback_listener.detach(self)
        if self._own_scheduler:
            self.scheduler.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
