"""The TCP client: one connection, one reader thread, calls that never block.

>>> from controller import CommandServer, Client
>>> with CommandServer(port=0) as server, Client(server.address) as client:
...     future = client.send_command("rpc.ping")
...     future.result(timeout=5)
'pong'

The request contracts (one outcome per request, timeouts, late outcomes, ``future.cancel()``
versus :meth:`~controller.client_base.BaseClient.cancel`) are every client's:
:mod:`controller.client_base`. What is TCP's:

- A lost connection fails every pending request with
  :class:`~controller.errors.ConnectionLostError`; late outcomes still awaited are given up
  (``lost=True``).
- ``send_command(..., key=KEY)`` sends an idempotency key: a device command with the same key
  runs at most once on its server (a retry joins the running execution or gets its stored
  outcome, then ``future.replayed`` is True). ``rpc.*`` methods ignore keys.
- A reply the client cannot decode (over the frame limit, nested too deep) is never dropped:
  the request with its id fails at once with a :class:`~controller.errors.ParseError` saying
  why. The limits are the server's (see :mod:`controller.client_reader`).
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

import logging
import secrets
import socket
import ssl as ssl_module
import threading
from collections.abc import Callable
from typing import Any

from statemachines.addresses import Address, is_mqtt_url, parse_address

from .callback_listener import ID_SEPARATOR, CallbackListener
from .client_base import (
    MAX_LATE,
    BaseClient,
    Callback,
    CommandFuture,
    Handler,
    LateCallback,
    LateOutcome,
    Pending,
)
from .client_hello import hello
from .client_reader import ReplyReader, Undecodable, limits_of, read_events
from .errors import ConnectionLostError, RpcError, error_for
from .protocol import ErrorResponse, Notification, Response, encode
from .scheduler import Scheduler

log = logging.getLogger("statelink.client")


class Client(BaseClient):
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
        if is_mqtt_url(address):
            raise ValueError(
                f"{address!r} is a fleet node: use controller.mqtt.client.MqttClient "
                "(or WorkflowRunner.client) for mqtt:// addresses"
            )
        self.address = parse_address(address)
        super().__init__(
            name=name,
            scheduler=scheduler,
            timers_name=f"statelink-client-timers-{self.address[1]}",
        )
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.callback_listener = callback_listener
        #: random per client; request ids are ``f"{id_prefix}.{n}"`` with callback delivery
        self.id_prefix: str | None = (
            secrets.token_hex(16) if callback_listener is not None else None
        )
        self._reply_reader = ReplyReader()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._connected = threading.Event()
        self._reader: threading.Thread | None = None
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

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

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

    def _lost(self) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        host, port = self.address
        self._fail_all(
            lambda request_id, entry: ConnectionLostError(
                f"connection to {host}:{port} lost before the reply to "
                f"{entry.method} (id {request_id})",
                {"method": entry.method},
            )
        )
        if was_connected:
            self._emit_connection(False)

    # -- calls ------------------------------------------------------------------------------
    def _new_id(self) -> int | str:
        number = next(self._ids)
        if self.id_prefix is None:
            return number
        return f"{self.id_prefix}{ID_SEPARATOR}{number}"

    def _transmit(
        self, request_id: Any, entry: Pending, data: bytes, timeout: float
    ) -> RpcError | None:
        if self._send(data):
            return None
        return ConnectionLostError(
            f"not connected to {self.address[0]}:{self.address[1]}"
            + (" (reconnecting)" if self.reconnect and not self._closed.is_set() else ""),
            {"method": entry.method},
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

    def notify(self, method: str, params: Any = None) -> bool:
        """Send a notification (no reply, ever). Returns False when not connected."""
        return self._send(encode(Notification(method, params)))

    def subscribe(self, method: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(params)`` for each notification ``method``; also asks the server to
        send it (``rpc.subscribe``), again after each reconnect. Returns an unsubscribe."""
        if self._add_handler(method, handler) and self.connected:
            self.call("rpc.subscribe", {"method": method}, timeout=self.connect_timeout)

        def unsubscribe() -> None:
            if self._remove_handler(method, handler) and self.connected:
                self.send_command("rpc.unsubscribe", {"method": method})

        return unsubscribe

    def _resubscribe(self) -> None:
        for method in list(self._subscribers):
            self.send_command("rpc.subscribe", {"method": method})

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


__all__ = [
    "MAX_LATE",
    "Callback",
    "CallbackListener",
    "Client",
    "CommandFuture",
    "LateCallback",
    "LateOutcome",
    "parse_address",
]
