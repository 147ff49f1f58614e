"""``CommandServer``: the server's lifecycle (I/O thread, listening socket, worker pool, other
transports, start and stop) around the dispatch core, and the registration of function
commands."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl as ssl_module
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import CancelledError
from ..protocol import DEFAULT_PORT
from ..workers import WorkerPool
from .builtins import install_builtins
from .calls import Deadlines
from .commands import FunctionCommand
from .connection import Connection, Connections
from .core import Core
from .stats import Limits

log = logging.getLogger("statelink.server")

#: seconds stop() waits, after the grace, for cancelled device handlers to return
SETTLE_AT_STOP = 1.0


class Transport(Protocol):
    """Another way in to the core besides the TCP socket (e.g. an MQTT fleet node:
    :class:`~controller.mqtt.node.MqttNode`), started and stopped with the server
    (:meth:`CommandServer.add_transport`).

    ``start()`` runs in :meth:`CommandServer.start` once the I/O loop runs (on the calling
    thread; blocking, bounded): an exception fails the start (the server stops again and
    re-raises it). ``stop()`` runs in :meth:`CommandServer.stop` once every call was answered,
    while the loop still runs (calling thread; blocking, bounded).
    """

    def start(self) -> None: ...

    def stop(self) -> None: ...


class CommandServer(Core):
    """A JSON-RPC 2.0 command server; see :mod:`controller.server` for the contracts.

    ``host`` defaults to loopback; ``port=0`` picks a free port (read it from ``address``);
    ``port=None`` opens no TCP socket at all (the server is reached through its other
    transports only, e.g. MQTT: :meth:`add_transport`).

    ``state_dir``: where the idempotency keys of device commands are kept (SQLite, opened at
    :meth:`start`, closed at :meth:`stop`); a key survives a restart for ``key_retention``
    seconds. Without a ``state_dir`` keys are honoured in memory only: a stop forgets them.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = DEFAULT_PORT,
        *,
        workers: int = 8,
        timeout: float = 30.0,
        grace: float = 5.0,
        limits: Limits | None = None,
        secret: bytes | str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        name: str = "statelink",
        state_dir: str | os.PathLike[str] | None = None,
        key_retention: float = 86400.0,
    ) -> None:
        super().__init__(
            workers=workers,
            timeout=timeout,
            limits=limits,
            secret=secret,
            name=name,
            state_dir=state_dir,
            key_retention=key_retention,
        )
        self.host = host
        self.port = port
        self.grace = grace
        self.ssl = ssl
        self.tcp = Connections(self)
        self.transports: list[Transport] = []
        self._started: list[Transport] = []  #: the transports started, in order
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._address: tuple[str, int] | None = None
        install_builtins(self)

    @property
    def connections(self) -> set[Connection]:
        """The open TCP connections (loop thread)."""
        return self.tcp.open

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

    def add_transport(self, transport: Transport) -> None:
        """Serve through ``transport`` too, started and stopped with this server (at once if
        it runs already); see :class:`Transport`."""
        if transport in self.transports:
            return
        self.transports.append(transport)
        if self._thread is not None and not self.stopping:
            transport.start()
            self._started.append(transport)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on; valid after :meth:`start` (never with
        ``port=None``)."""
        if self._address is None:
            raise RuntimeError(
                "the server has no TCP socket (port=None)"
                if self.port is None
                else "the server is not started; call start() first"
            )
        return self._address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.stopping

    def start(self) -> CommandServer:
        """Start listening; returns once the socket accepts connections and every transport
        started (:meth:`add_transport`).

        A stopped server can be started again (on a new port when ``port`` is 0); it keeps its
        commands, devices and ``rpc.stats`` counters.

        Raises ``OSError`` with the reason when it cannot listen (e.g. the port is in use), and
        what a transport's ``start()`` raised (the server is stopped again then).
        """
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        self.keys.open()  # KeyStoreError (e.g. KeyStoreLocked): the state dir is not usable
        for plugin in self.devices.values():  # before the I/O thread: no connection yet
            plugin.start()
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
            self.keys.close()
            exc = failure[0]
            if isinstance(exc, OSError):
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise OSError(
                    exc.errno, f"cannot listen on {self.host}:{self.port}: {reason}"
                ) from exc
            raise exc
        try:
            for transport in self.transports:
                transport.start()
                self._started.append(transport)
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    async def _listen(self) -> None:
        # A start() after stop(): nothing of the last run carries over but the registrations
        # and the rpc.stats counters (a connection or a notification the last run left
        # behind must not count here, and its drained event belongs to its closed loop).
        self.stopping = False
        self.drained = None
        self.sessions = set()
        self.tcp = Connections(self)
        self.inflight = 0
        self.deadlines = Deadlines(self.loop)  # both belong to this loop: none from an old one
        self.pool = WorkerPool(self.loop, self.workers, self.limits.max_queue)
        self._address = None
        self.started_at = time.monotonic()
        if self.port is None:  # no TCP: the transports are the only way in
            return
        try:
            self._server = await self.loop.create_server(
                self.tcp.new,
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
        started, self._started = self._started, []
        served = bool(started) or self._address is not None  # else a start that failed
        for transport in reversed(started):  # every call is answered: their last words
            try:
                transport.stop()
            except Exception:
                log.exception("stopping a transport failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(timeout=10)
        self.pool.shutdown()
        for plugin in self.devices.values():
            try:
                plugin.stop()
            except Exception:
                log.exception("stop hook failed")
        self.keys.close()  # after the workers drained: every outcome recorded is written
        self._thread = None
        log.log(logging.INFO if served else logging.DEBUG, "stopped")

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
        self.keys.shutdown()
        # (a transport's peers may share one calls dict: each call is answered once)
        leftover = list(
            dict.fromkeys(call for session in self.sessions for call in session.calls.values())
        )
        for call in leftover:
            call.mark_cancelled()
        for call in leftover:
            call.reject(
                CancelledError(
                    "the server stopped before the command finished", {"reason": "shutdown"}
                )
            )
        # Device handlers just cancelled get a moment (at most SETTLE_AT_STOP s) to return, so
        # that their device settles as cancelled, not faulted as "outcome unknown" at stop.
        settle_by = self.loop.time() + SETTLE_AT_STOP
        while self.busy and self.loop.time() < settle_by:
            await asyncio.sleep(0.01)
        self.pool.shutdown(
            error=CancelledError(
                "the server stopped before the command started", {"reason": "shutdown"}
            )
        )
        self.tcp.close_all("shutdown")
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
            self.tcp.sweep(time.monotonic())
