"""Replies delivered by connecting back: :class:`CallbackListener`, shared by clients.

It routes each reply to the client whose request has exactly that id (by the id's random
per-client prefix), through the client's ``deliver_reply``; it knows clients only through
the small :class:`ReplyTarget` protocol, so it does not import the client.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Protocol

from statemachines.addresses import Address

from .client_reader import Undecodable, read_events
from .protocol import ErrorResponse, Response

log = logging.getLogger("statelink.client")

#: separates a client's random id prefix from its request number (callback delivery only)
ID_SEPARATOR = "."


class ReplyTarget(Protocol):
    """What the listener needs of a client (:class:`~controller.client.Client`)."""

    @property
    def id_prefix(self) -> str | None: ...

    def deliver_reply(self, event: Response | ErrorResponse | Undecodable) -> bool: ...


def _describe(event: Any) -> str:
    if isinstance(event, (Response, ErrorResponse, Undecodable)):
        return f"reply, id {event.id!r}"[:120]
    return type(event).__name__.lower()


class CallbackListener:
    """Receives replies that a server delivers by connecting back to this client.

    >>> listener = CallbackListener()            # 127.0.0.1, a free port
    >>> # client = Client(address, callback_listener=listener)
    >>> listener.close()

    The server connects to the requesting peer's own IP address only, so the listener must
    listen on the address the client connects from (default loopback).

    One listener may serve several clients. Each client numbers its requests
    ``"<prefix>.<n>"`` with its own random prefix (:attr:`Client.id_prefix`), and a reply goes
    to the client whose pending request has exactly that id. Anything else that arrives here
    (a reply to no pending request: late, cancelled, or injected by whoever else connected to
    the listener; a notification; a batch) is dropped and counted in :attr:`dropped`.
    :attr:`received` counts every message read, :attr:`delivered` those given to a client.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = 16):
        # Replies are read with the protocol's default frame and depth limits (a reply it
        # cannot decode still fails its request at once: see controller.client_reader).
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.2)
        self.address: Address = self._sock.getsockname()[:2]
        self.max_connections = max_connections
        self._clients: dict[str, ReplyTarget] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.received = 0
        self.delivered = 0
        self.dropped = 0
        self._accept = threading.Thread(
            target=self._accept_forever, name="statelink-callback-listener", daemon=True
        )
        self._accept.start()

    def attach(self, client: ReplyTarget) -> None:
        if client.id_prefix is None:
            raise ValueError("a client needs an id_prefix to receive replies by callback")
        with self._lock:
            self._clients[client.id_prefix] = client

    def detach(self, client: ReplyTarget) -> None:
        with self._lock:
            if client.id_prefix is not None and self._clients.get(client.id_prefix) is client:
                del self._clients[client.id_prefix]

    def _accept_forever(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) >= self.max_connections:
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve, args=(conn,), daemon=True, name="statelink-callback-conn"
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        try:
            peer = conn.getpeername()[:2]
        except OSError:
            peer = ("?", 0)
        warned = False

        def route(event: Any) -> None:
            nonlocal warned
            if self._route(event):
                return
            # Late replies (after a client timeout or cancel) land here too: warn once per
            # connection, not once per reply, so a flood cannot flood the log.
            level = logging.DEBUG if warned else logging.WARNING
            warned = True
            log.log(
                level,
                "callback listener %s:%s dropped a message from %s:%s that matches no pending "
                "request (%s)",
                *self.address,
                *peer,
                _describe(event),
            )

        with conn:
            read_events(conn, self._closed, route)

    def _route(self, event: Any) -> bool:
        """Deliver one reply to the client whose pending request has exactly its id."""
        client = None
        with self._lock:
            self.received += 1
            if isinstance(event, (Response, ErrorResponse, Undecodable)) and isinstance(
                event.id, str
            ):
                prefix, separator, _ = event.id.rpartition(ID_SEPARATOR)
                if separator:
                    client = self._clients.get(prefix)
        delivered = client is not None and client.deliver_reply(event)
        with self._lock:
            if delivered:
                self.delivered += 1
            else:
                self.dropped += 1
        return delivered

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._accept.join(timeout=2)
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> CallbackListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["ID_SEPARATOR", "CallbackListener", "ReplyTarget"]
