"""The runner's notifications: the await index, the bounded queue and the subscriptions.

A notification goes only to the runs awaiting it now: an index ``(server address, method) ->
runs`` kept up to date through ``WorkflowRun.on_await_change``. Notifications keep their place
in the dispatcher's order, but at most ``max_queued`` (:data:`MAX_QUEUED_NOTIFICATIONS`) wait
at a time: more are dropped and counted (``dropped``); an await that misses one still times
out. The runner subscribes to a method when a run awaits it (and when a run starts, for the
methods its workflow awaits, before its first step) and unsubscribes ``unsubscribe_after``
seconds after the last run awaiting it left.

Threads: :meth:`Notifications.post` runs on transport threads, :meth:`subscribe_awaited` on
the caller's thread of ``start``/``resume``; everything else on the dispatcher thread.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from statemachines.addresses import ServerAddress, format_address
from statemachines.workflow import CompiledWorkflow, WorkflowRun

from .errors import RpcError
from .run_handle import RunHandle
from .scheduler import Scheduler
from .senders import Post, Sender

__all__ = ["MAX_QUEUED_NOTIFICATIONS", "UNSUBSCRIBE_AFTER", "Notifications"]

log = logging.getLogger("statelink.runner")

MAX_QUEUED_NOTIFICATIONS = 1000  #: notifications waiting for the dispatcher; more are dropped
UNSUBSCRIBE_AFTER = 2.0  #: seconds nothing awaits a method before the runner unsubscribes

_Key = tuple[ServerAddress, str]  #: (server address, method)


class Notifications:
    """The notifications of one runner's runs (see the module docstring).

    ``senders``: the runner's senders by address (read, never changed); ``post``: queue a
    call for the dispatcher; ``wake``: queue one "deliver the oldest notification" event for
    the dispatcher, which then calls :meth:`deliver_next`; ``on_dispatcher``: True on the
    dispatcher thread; ``closed``: True once the runner is closed.
    """

    def __init__(
        self,
        senders: Mapping[ServerAddress, Sender],
        scheduler: Scheduler,
        post: Post,
        wake: Callable[[], None],
        on_dispatcher: Callable[[], bool],
        closed: Callable[[], bool],
    ) -> None:
        self.max_queued = MAX_QUEUED_NOTIFICATIONS  #: queued at most; more are dropped
        self.unsubscribe_after = UNSUBSCRIBE_AFTER  #: idle seconds before unsubscribing
        self.dropped = 0  #: the queue was full
        self._senders = senders
        self._scheduler = scheduler
        self._post = post
        self._wake = wake
        self._on_dispatcher = on_dispatcher
        self._closed = closed
        self._notes: deque[tuple[ServerAddress, str, Any]] = deque()  #: one wake per note
        self._lock = threading.Lock()  #: guards _notes and dropped
        #: dispatcher only: (address, method) -> the runs awaiting it now (with the server name)
        self._awaiting: dict[_Key, dict[RunHandle, str]] = {}
        self._await_key: dict[RunHandle, _Key] = {}

    @property
    def waiting(self) -> int:
        """Notifications queued for the dispatcher (at most ``max_queued``)."""
        return len(self._notes)

    def subscribe_awaited(
        self, compiled: CompiledWorkflow, addresses: dict[str, ServerAddress]
    ) -> None:
        """Caller's thread, before a run starts: subscribe to what its workflow awaits, so
        that its first await misses nothing (a sender keeps a subscription it has)."""
        for server, method in compiled.awaited():
            address = addresses.get(server)
            if address is None:
                continue
            try:
                self._senders[address].subscribe(method, self._handler(address, method))
            except (OSError, RpcError) as exc:
                log.warning(
                    "cannot subscribe to %s at %s: %s", method, format_address(address), exc
                )
            else:  # unsubscribed again if no run awaits it after a while
                self._unsubscribe_later((address, method))

    def post(self, address: ServerAddress, method: str, params: Any) -> None:
        """A transport thread: queue a notification in order, or drop it when full."""
        with self._lock:
            if len(self._notes) >= self.max_queued:
                self.dropped += 1
                return
            self._notes.append((address, method, params))
        self._wake()

    def deliver_next(self) -> None:
        """Dispatcher: hand the oldest queued notification to the runs awaiting it."""
        with self._lock:
            address, method, params = self._notes.popleft()
        runs = self._awaiting.get((address, method))
        if not runs:
            return
        for handle, server in list(runs.items()):  # a run leaving its await changes runs
            try:
                handle.run.on_notification(server, method, params)
            except Exception:
                log.exception("notification %s for run %s failed", method, handle.run_id)

    def await_changed(self, handle: RunHandle, run: WorkflowRun) -> None:
        """``run.on_await_change``: update the index (on the dispatcher; a run driven on
        another thread, e.g. while it is rebuilt, is indexed once the dispatcher gets to it)."""
        if self._on_dispatcher():
            self._reindex(handle)
        else:
            self._post(self._reindex, handle)

    def _handler(self, address: ServerAddress, method: str) -> Callable[[Any], None]:
        return functools.partial(self.post, address, method)

    def _reindex(self, handle: RunHandle) -> None:
        awaiting = handle.run.awaiting
        address = None if awaiting is None else handle.servers.get(awaiting[0])
        key = None if awaiting is None or address is None else (address, awaiting[1])
        old = self._await_key.get(handle)
        if old == key:
            return
        if old is not None:
            del self._await_key[handle]
            runs = self._awaiting[old]
            del runs[handle]
            if not runs:
                del self._awaiting[old]
                self._unsubscribe_later(old)
        if key is not None and awaiting is not None:
            self._await_key[handle] = key
            runs = self._awaiting.setdefault(key, {})
            if not runs:  # subscribe (a no-op while subscribed), without waiting
                self._senders[key[0]].subscribe(key[1], self._handler(*key), wait=False)
            runs[handle] = awaiting[0]

    def _unsubscribe_later(self, key: _Key) -> None:
        self._scheduler.call_later(self.unsubscribe_after, self._post, self._unsubscribe_idle, key)

    def _unsubscribe_idle(self, key: _Key) -> None:
        if key not in self._awaiting and not self._closed():
            self._senders[key[0]].unsubscribe(key[1])
