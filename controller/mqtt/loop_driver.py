"""A paho client run by an asyncio loop instead of paho's own network thread (the node side:
:mod:`.node`).

The socket's reads, writes and keepalive happen on the loop, so a request read from the broker
is handled, answered and written by one thread, with no hand-off per message (on the 2-core
benchmark machine, handing each message from paho's thread to the loop and the reply back
added about 0.1 ms per request, some 20 % at one request in flight). paho's callbacks
(``on_connect``, ``on_message``, ``on_subscribe``, ...) run on the loop thread; so must every
call into the client once it is connected (``publish``, ``subscribe``, ``ack``, ...).

Only the blocking part of a connect (TCP connect and TLS handshake: paho's ``reconnect()``)
runs off the loop: the first connect on the caller's thread (:meth:`LoopDriver.connect`),
reconnects on a short-lived thread, after a backoff of :data:`~.connection.RECONNECT_MIN`
doubling to :data:`~.connection.RECONNECT_MAX` seconds. A connect that gets no CONNACK is
closed by paho's keepalive check after ``options.keepalive`` seconds, and retried.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from statemachines.addresses import BrokerUrl

from .connection import (
    RECONNECT_MAX,
    RECONNECT_MIN,
    OnConnect,
    connect_properties,
    no_answer,
    refusal,
    unreachable,
)
from .options import MqttOptions

log = logging.getLogger("statelink.mqtt")


class LoopDriver:
    """Runs ``client`` (made by :func:`~.connection.new_client`) on ``loop``, which must be
    running. ``on_connect(session_present)`` runs on the loop after every successful connect.
    The session is never started clean (Clean Start off): ``session_expiry`` seconds of
    persistence across disconnects and restarts."""

    def __init__(
        self,
        client: mqtt.Client,
        loop: asyncio.AbstractEventLoop,
        broker: BrokerUrl,
        options: MqttOptions,
        on_connect: OnConnect,
        *,
        session_expiry: int,
        name: str,
    ) -> None:
        self.client = client
        self.loop = loop
        self.broker = broker
        self.options = options
        self.on_connect = on_connect
        self.session_expiry = session_expiry
        self.name = name  #: for log lines and thread names
        self.connected = False  #: the broker accepted the connection (loop thread)
        self.closing = False
        self._delay: float = RECONNECT_MIN
        self._retry: asyncio.TimerHandle | None = None  #: the next reconnect
        self._tick_timer: asyncio.TimerHandle | None = None  #: the next keepalive check
        self._dialing: threading.Thread | None = None
        self._first = threading.Event()  #: the first CONNACK came
        self._refused: str | None = None  #: the first CONNACK's refusal
        self._gone: threading.Event | None = None  #: set once the socket is closed (close())
        self._socket_opened: Callable[..., Any] | None = client.on_socket_open
        client.on_socket_open = self._opened
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote
        client.on_connect = self._connack
        client.on_disconnect = self._lost

    # -- any thread ---------------------------------------------------------------------------
    def connect(self) -> None:
        """The first connect (a thread other than the loop's): returns once the broker accepted
        it (``on_connect`` has run), else raises :class:`~.connection.BrokerError` within
        ``options.connect_timeout`` seconds (nothing is left running then)."""
        options = self.options
        try:
            self.client.connect(
                self.broker.host,
                self.broker.port,
                keepalive=options.keepalive,
                clean_start=False,
                properties=connect_properties(self.session_expiry),
            )
        except (OSError, ValueError) as exc:
            self.close()
            raise unreachable(self.broker, exc) from exc
        self.loop.call_soon_threadsafe(self._tick)
        if not self._first.wait(options.connect_timeout) or self._refused is not None:
            self.close()
            if self._refused is not None:
                raise refusal(self.broker, self._refused)
            raise no_answer(self.broker, options)

    def call(self, func: Callable[[], Any], timeout: float) -> Any:
        """``func()`` on the loop, from another thread; its result (or exception). Raises
        TimeoutError when it did not run within ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(_call(func), self.loop)
        return future.result(timeout)

    def close(self, reason: ReasonCode | None = None) -> None:
        """Stop reconnecting and disconnect (with ``reason``, e.g. "Disconnect with will
        message"; default: a normal disconnect, the broker discards the Will); return once the
        socket is closed (bounded by ``options.connect_timeout``). From a thread other than the
        loop's."""
        self.closing = True
        dialing = self._dialing
        if dialing is not None:
            dialing.join(self.options.connect_timeout + 1)
        gone = threading.Event()

        def shut() -> None:
            for timer in (self._retry, self._tick_timer):
                if timer is not None:
                    timer.cancel()
            self._retry = self._tick_timer = None
            if self.client.socket() is None:
                gone.set()
                return
            self._gone = gone
            self.client.disconnect(reasoncode=reason)  # written by the loop, then closed

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(shut)
            if gone.wait(self.options.connect_timeout):
                return
            log.warning("%s: the broker connection did not close in time; dropping it", self.name)
        sock = self.client.socket()
        if sock is not None:  # the loop is gone or stuck: close it under paho's feet
            sock.close()

    # -- socket callbacks (paho calls them on the thread that acts on the socket) -------------
    def _soon(self, func: Callable[..., Any], *args: Any) -> None:
        """``func(*args)`` on the loop: now if this is the loop thread, else next."""
        try:
            running = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            running = False
        if running:
            _guarded(func, *args)
        else:
            try:
                self.loop.call_soon_threadsafe(_guarded, func, *args)
            except RuntimeError:  # the loop is closed
                pass

    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._socket_opened is not None:
            self._socket_opened(client, userdata, sock)  # TCP_NODELAY
        self._soon(self.loop.add_reader, sock, self._read)

    def _socket_closed(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # On the loop thread (every close happens there): the reader goes before the fd does.
        self._soon(self._detach, sock)

    def _detach(self, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)
        if self._gone is not None:
            self._gone.set()

    def _want_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._soon(self.loop.add_writer, sock, self._write)

    def _wrote(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._soon(self.loop.remove_writer, sock)

    # -- the loop thread ----------------------------------------------------------------------
    def _read(self) -> None:
        client = self.client
        try:
            client.loop_read()
            while True:  # TLS: bytes decrypted already (in the SSL object), unseen by epoll
                pending = getattr(client.socket(), "pending", None)
                if pending is None or not pending():
                    break
                client.loop_read()
        except Exception:
            log.exception("%s: reading from the broker failed", self.name)

    def _write(self) -> None:
        try:
            self.client.loop_write()
        except Exception:
            log.exception("%s: writing to the broker failed", self.name)

    def _tick(self) -> None:
        """Each second: keepalive (PINGREQ, a dead or silent connection is closed), and any
        write that a registration missed."""
        self._tick_timer = None
        if self.closing:
            return
        client = self.client
        try:
            client.loop_misc()
            if client.socket() is not None and client.want_write():
                client.loop_write()
        except Exception:
            log.exception("%s: the keepalive check failed", self.name)
        self._tick_timer = self.loop.call_later(1.0, self._tick)

    def _connack(
        self, _client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        if self.closing:  # a reconnect that finished after close(): no more of it
            self.client.disconnect()
            return
        if reason.is_failure:
            if not self._first.is_set():
                self._refused = str(reason)
                self._first.set()
            else:
                log.error("%s: the MQTT broker %s refused: %s", self.name, self.broker, reason)
            return
        self.connected = True
        self._delay = RECONNECT_MIN
        try:
            self.on_connect(bool(getattr(flags, "session_present", False)))
        except Exception:
            log.exception("%s: setting up the connection failed", self.name)
        self._first.set()

    def _lost(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self.connected = False
        if self.closing or not self._first.is_set() or self._refused is not None:
            return  # connect() raises (the first connect's refusal): nothing to reconnect
        log.warning(
            "%s: lost the connection to %s (%s); reconnecting in %g s",
            self.name,
            self.broker,
            reason,
            self._delay,
        )
        self._schedule()

    def _schedule(self) -> None:
        if self.closing or self._retry is not None or self._dialing is not None:
            return
        self._retry = self.loop.call_later(self._delay, self._dial)
        self._delay = min(self._delay * 2, RECONNECT_MAX)

    def _dial(self) -> None:
        self._retry = None
        if self.closing:
            return
        self._dialing = threading.Thread(
            target=self._redial, name=f"statelink-mqtt-dial-{self.name}", daemon=True
        )
        self._dialing.start()

    def _redial(self) -> None:
        """paho's blocking reconnect (its own thread): a new socket and a CONNECT queued."""
        try:
            self.client.reconnect()
            failure = None
        except (OSError, ValueError) as exc:
            failure = str(unreachable(self.broker, exc))
        except Exception as exc:  # never let a surprise end the reconnects
            log.exception("%s: reconnecting failed", self.name)
            failure = f"reconnecting failed: {type(exc).__name__}: {exc}"
        try:
            self.loop.call_soon_threadsafe(self._dialed, failure)
        except RuntimeError:  # the loop is closed
            pass

    def _dialed(self, failure: str | None) -> None:
        self._dialing = None
        if failure is not None and not self.closing:
            log.info("%s: %s; trying again in %g s", self.name, failure, self._delay)
            self._schedule()


async def _call(func: Callable[[], Any]) -> Any:
    return func()


def _guarded(func: Callable[..., Any], *args: Any) -> None:
    try:
        func(*args)
    except (OSError, ValueError):  # a socket closed meanwhile
        pass


__all__ = ["LoopDriver"]
