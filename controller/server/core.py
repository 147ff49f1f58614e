"""The transport-neutral dispatch core: the methods, the bounds, the counters, the worker
pool and the deadlines shared by every session of one server, whatever carries its bytes.

A transport (TCP today, MQTT next) creates one :class:`~.session.Session` per peer on a
:class:`Core` and hands it decoded messages; the session answers through the ``send`` the
transport gave it. Plugins (served devices) attach here through :class:`Plugin`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..workers import WorkerPool
from .calls import Call, Deadlines, Dispatch
from .keys import Keys
from .stats import Limits, Stats

PROTOCOL_VERSION = "1.0"


class Plugin(Protocol):
    """Something served with the server, e.g. a device (:mod:`controller.devices`).

    ``start()`` runs in :meth:`CommandServer.start` before the I/O thread starts, ``stop()`` in
    :meth:`CommandServer.stop` after it ended; ``busy`` tells the stop whether a handler still
    runs (it waits a moment for it to return); ``describe()`` is its entry in ``rpc.discover``.
    """

    @property
    def busy(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class Peer(Protocol):
    """What the core needs of a session (:class:`~.session.Session`)."""

    calls: dict[Any, Call]
    subscriptions: set[str]

    def notify(self, method: str, params: Any) -> None: ...


class Core:
    """The state every session of one server shares. Loop thread only, unless a method says
    otherwise. ``loop``, ``pool`` and ``deadlines`` exist while the server runs.

    ``keys`` holds the idempotency keys of device commands (:mod:`.keys`): in
    ``state_dir`` (SQLite, survives a restart) or, with ``state_dir`` None, in memory only.
    """

    def __init__(
        self,
        *,
        workers: int = 8,
        timeout: float = 30.0,
        limits: Limits | None = None,
        secret: bytes | str | None = None,
        name: str = "statelink",
        state_dir: str | os.PathLike[str] | None = None,
        key_retention: float = 86400.0,
    ) -> None:
        self.workers = workers
        self.default_timeout = timeout
        self.limits = limits or Limits()
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.name = name
        self.methods: dict[str, Dispatch] = {}
        self.devices: dict[str, Plugin] = {}
        self.sessions: set[Peer] = set()
        self.stats = Stats()
        self.inflight = 0  #: requests in flight over every session
        self.stopping = False  #: new requests are refused busy
        self.drained: asyncio.Event | None = None  #: set when inflight drops to 0 (at stop)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pool: WorkerPool = None  # type: ignore[assignment]
        self.deadlines: Deadlines = None  # type: ignore[assignment]
        self.started_at = 0.0
        self.keys = Keys(None if state_dir is None else Path(state_dir), key_retention)

    def register(self, name: str, dispatch: Dispatch) -> None:
        """Register a custom :class:`Dispatch` (used for devices)."""
        if name in self.methods:
            raise ValueError(f"method {name!r} is already registered")
        self.methods[name] = dispatch

    def attach(self, name: str, plugin: Plugin) -> None:
        """Serve ``plugin`` with this server (as ``devices[name]``); see :class:`Plugin`."""
        if name in self.devices:
            raise ValueError(f"{name!r} is already served")
        self.devices[name] = plugin

    @property
    def busy(self) -> bool:
        """True while a plugin's handler still runs."""
        return any(plugin.busy for plugin in self.devices.values())

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the I/O thread (thread-safe; dropped after stop)."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def publish(self, method: str, params: Any) -> None:
        """Send a notification to every session subscribed to ``method`` (loop thread)."""
        for session in self.sessions:
            if method in session.subscriptions:
                session.notify(method, params)

    def discover(self) -> dict[str, Any]:
        """The ``rpc.discover`` answer: an OpenRPC 1.3.2 document of every method (sorted by
        name; each method's ``describe()`` is its method object), the error kinds
        (``components.errors``, keyed by kind) and, as the extensions ``x-notifications``
        and ``x-devices``, the notifications it sends and every plugin's ``describe()``.
        docs/protocol.md shows it."""
        from statemachines.catalog import NOTIFICATIONS, openrpc_errors

        methods = [
            dict(entry.describe(), name=name) for name, entry in sorted(self.methods.items())
        ]
        return {
            "openrpc": "1.3.2",
            "info": {
                "title": self.name,
                "version": PROTOCOL_VERSION,
                "description": "statelink: JSON-RPC 2.0 over TCP, one JSON text per line "
                "(docs/protocol.md).",
            },
            "methods": methods,
            "components": {"errors": openrpc_errors()},
            "x-notifications": NOTIFICATIONS,
            "x-devices": [plugin.describe() for plugin in self.devices.values()],
        }

    def stats_snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(
            connections=len(self.sessions),
            inflight=self.inflight,
            worker_queue=self.pool.pending if self.pool else 0,
            workers=self.workers,
            uptime=time.monotonic() - self.started_at,
            limits=self.limits,
        )
