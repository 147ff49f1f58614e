"""The callback link: TCP replies delivered by connecting back to the requesting peer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("statelink.server")

CONNECT_TIMEOUT = 5.0  #: seconds to connect back before replies go on the request connection


class RequestConnection(Protocol):
    """What a link needs of the request connection it serves (:class:`~.connection.Connection`)."""

    peer: tuple[str, int]
    closing: bool
    max_outgoing: int
    loop: asyncio.AbstractEventLoop

    def write(self, data: bytes) -> None: ...

    def overflow(self) -> None: ...


class CallbackLink:
    """Replies delivered by connecting back to the requesting peer's own address.

    The link starts connecting when it is made (``rpc.hello``), bounded by
    :data:`CONNECT_TIMEOUT`; :meth:`when_ready` tells once the connect succeeded or failed
    (``rpc.hello`` is answered then). Each reply goes exactly one way: over the link while it
    is usable, else on the request connection (:meth:`Connection.write`). Replies written
    while it connects wait for it. The link becomes unusable when it cannot connect, when the
    peer closes it (EOF) or it fails (reset, write error: :class:`_CallbackProtocol`), and
    when :meth:`close` ends it; replies still waiting for the link to connect then go to the
    request connection. A reply already handed to a link's socket when the peer closed it is
    lost with it (TCP gives no receipt), which the client's own timeout covers.
    """

    def __init__(self, conn: RequestConnection, port: int):
        self.conn = conn
        self.host = conn.peer[0]  # never any other host
        self.port = port
        self.usable = True
        #: None while connecting or once connected; why not, once the connect failed or ended
        self.error: str | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._waiters: list[Callable[[str | None], None]] | None = []  #: None once settled
        self._task = conn.loop.create_task(self._connect())

    def when_ready(self, callback: Callable[[str | None], None]) -> None:
        """``callback(None)`` once connected, ``callback(error)`` once it cannot be (at once
        if already settled). Loop thread."""
        if self._waiters is None:
            callback(self.error)
        else:
            self._waiters.append(callback)

    def _settle(self, error: str | None) -> None:
        waiters, self._waiters = self._waiters, None
        if waiters is None:
            return
        if error is not None and self.error is None:
            self.error = error
        for callback in waiters:
            try:
                callback(error)
            except Exception:  # one waiter's failure must not keep the others waiting
                log.exception("callback link waiter failed")

    def write(self, data: bytes) -> None:
        if not self.usable:
            self.conn.write(data)
            return
        limit = self.conn.max_outgoing
        transport = self._transport
        if transport is not None:
            transport.write(data)
            if transport.get_write_buffer_size() > limit:
                self.conn.overflow()
            return
        self._pending.append(data)  # still connecting
        self._pending_bytes += len(data)
        if self._pending_bytes > limit:
            self.conn.overflow()

    async def _connect(self) -> None:
        loop = self.conn.loop
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _CallbackProtocol(self), self.host, self.port),
                timeout=CONNECT_TIMEOUT,
            )
        except asyncio.TimeoutError:
            self._failed(f"no answer within {CONNECT_TIMEOUT:g} s")
            return
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            return
        except asyncio.CancelledError:  # the server stops: what waits goes the other way
            self.error = "the server is stopping"
            self.close()
            raise
        assert isinstance(transport, asyncio.Transport)
        if not self.usable:  # closed (or lost) while connecting: its waiters were told
            transport.close()
            return
        self._transport = transport
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        if pending:
            transport.write(b"".join(pending))
            if transport.get_write_buffer_size() > self.conn.max_outgoing:
                self.conn.overflow()
        self._settle(None)

    def _failed(self, detail: str) -> None:
        self.error = f"cannot connect to {self.host}:{self.port}: {detail}"
        self.lost(f"cannot connect: {detail}")  # closes it, which tells the waiters

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
        the link's socket holds is flushed, unless ``abort``. Closed before it connected,
        it tells its waiters why first (an ``rpc.hello`` is answered before the replies to the
        requests that came after it)."""
        self.usable = False
        if self._waiters is not None:
            self._settle(
                self.error
                or f"the callback link to {self.host}:{self.port} was closed before it connected"
            )
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
