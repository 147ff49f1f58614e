"""The TCP transport: one asyncio protocol per connection that only reads, writes and flushes.

Everything a request means is the :class:`~.session.Session`'s job; a :class:`Connection`
decodes the bytes it reads into events for its session and writes what the session sends.
:class:`Connections` is what the connections of one server run share: the set, the one
receive buffer, the one flush per loop iteration, and the sweep of idle and slow peers.
"""

from __future__ import annotations

import asyncio
import logging
import time

from statemachines import errorkinds as ek

from ..protocol import Decoder, ErrorResponse, encode
from .callback import CallbackLink
from .core import Core
from .session import Session

log = logging.getLogger("statelink.server")

#: bytes one read may take (as asyncio's own transports read)
RECV_SIZE = 256 * 1024

FLUSH_AT = 64 * 1024  #: bytes of replies queued on a connection before they are flushed at once


class Connections:
    """The TCP connections of one server run (loop thread only)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.open: set[Connection] = set()
        #: where every connection's reads land (see Connection)
        self.recv_buffer = memoryview(bytearray(RECV_SIZE))
        self._to_flush: list[Connection] = []

    def new(self) -> Connection:
        """The protocol factory of the listening socket."""
        return Connection(self.core, self)

    def flush_soon(self, conn: Connection) -> None:
        """Flush ``conn`` in the next loop iteration: one callback for all the connections
        that got replies in this iteration, not one per connection."""
        self._to_flush.append(conn)
        if len(self._to_flush) == 1:
            self.core.loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        conns, self._to_flush = self._to_flush, []
        for conn in conns:
            if conn._flush_scheduled:  # else flushed meanwhile (close, or FLUSH_AT)
                try:
                    conn._flush()
                except Exception:  # one connection's failure must not stall the others
                    conn._flush_scheduled = False
                    log.exception("flushing replies to %s:%s failed", *conn.peer)

    def sweep(self, now: float) -> None:
        """Close the peers that did not log in, finish a line, or do anything in time."""
        limits = self.core.limits
        for conn in list(self.open):
            session = conn.session
            if not session.authenticated and now - conn.connected_at > limits.handshake_timeout:
                conn.close("handshake_timeout")
            elif conn.partial_since is not None and now - conn.partial_since > limits.frame_timeout:
                conn.close("frame_timeout")
            elif not session.calls and now - conn.last_activity > limits.idle_timeout:
                if session.notified != conn.notified_seen:
                    # notifications went out since the last sweep: a listener is not idle
                    conn.notified_seen = session.notified
                    conn.last_activity = now
                else:
                    conn.close("idle_timeout")

    def close_all(self, reason: str) -> None:
        for conn in list(self.open):
            conn.close(reason)


class Connection(asyncio.BufferedProtocol):
    """One client connection: bytes -> events for its session, and its replies -> bytes.

    Reads land in the one receive buffer of :class:`Connections` (:meth:`get_buffer`), shared
    by every connection: the loop thread consumes each read in :meth:`buffer_updated` before
    the next. A plain ``Protocol`` gets a new ``bytes`` of 256 KiB per read instead, which
    glibc serves with mmap/munmap until something in the process happens to raise its mmap
    threshold: 15-18 us per read on the benchmark machine, as much as the rest of a request
    (docs/performance.md).
    """

    def __init__(self, core: Core, hub: Connections):
        self.core = core
        self.hub = hub
        limits = core.limits
        self.loop = core.loop
        # The backlog bound: max_outgoing bytes waiting, besides the reply being written (one
        # reply, up to a frame, never trips it on its own).
        self.max_outgoing = limits.max_outgoing + limits.max_frame + 1
        self.decoder = Decoder(limits.max_frame, limits.max_depth, limits.max_batch)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self.session: Session = None  # type: ignore[assignment]  # set by connection_made
        self.connected_at = self.last_activity = time.monotonic()
        self.partial_since: float | None = None  #: when the unfinished line in the buffer began
        self.notified_seen = 0  #: the session's notification count at the last idle check
        self.closing = False
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
        core, limit = self.core, self.core.limits.max_connections
        if len(self.hub.open) >= limit:
            core.stats.count_close("max_connections")
            transport.write(
                encode(
                    ErrorResponse(
                        None,
                        ek.BUSY,
                        f"too many connections (limit {limit}); try again later",
                        {"max_connections": limit},
                    )
                )
            )
            self.closing = True
            transport.close()
            return
        self.hub.open.add(self)
        self.session = Session(
            core,
            self.write,
            f"{self.peer[0]}:{self.peer[1]}",
            hangup=self.close,
            connect_back=self._link,
        )
        core.stats.connections_total += 1
        transport.set_write_buffer_limits(high=256 * 1024)

    def _link(self, port: int) -> CallbackLink:
        return CallbackLink(self, port)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.hub.open.discard(self)
        if self.session is not None:
            self.session.close()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.hub.recv_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.hub.recv_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = now = time.monotonic()
        decoder = self.decoder
        feed = self.session.feed
        for event in decoder.feed(data):
            feed(event)
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
        if self.session is not None and not self.closing:
            for event in self.decoder.finish():  # a last line without "\n" is answered too
                self.session.feed(event)
        self._flush()  # replies already queued go out before the transport closes
        return self.session is not None and self.session.half_close()

    # -- output -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue ``data`` for the peer (the session's ``send``)."""
        if self.closing or self.transport is None:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= FLUSH_AT:
            # Many (or big) replies in one loop iteration: hand them to the transport now, so
            # that max_outgoing is checked before more pile up here.
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.hub.flush_soon(self)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        transport = self.transport
        if self.closing or transport is None or not out:
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if transport.get_write_buffer_size() > self.max_outgoing:
            self.overflow()

    def overflow(self) -> None:
        """The peer does not read its replies (here or on its callback link): drop it."""
        if self.closing:
            return
        log.warning("closing %s:%s: it does not read its replies", *self.peer)
        self.core.stats.count_close("outgoing_buffer")
        self._closing()
        self._out.clear()
        self._out_bytes = 0
        if self.session.callback is not None:
            self.session.callback.close(abort=True)
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """Close after flushing what is queued (the session's ``hangup``)."""
        if self.closing:
            return
        self.core.stats.count_close(reason)
        self._flush()
        self._closing()
        if self.transport is not None:
            self.transport.close()

    def _closing(self) -> None:
        self.closing = True
        if self.session is not None:
            self.session.closed = True
