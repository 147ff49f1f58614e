"""A bounded pool of worker threads whose outcomes come back to an asyncio loop in batches.

Blocking handlers run here, never on the I/O thread. The pool has a fixed number of threads and
a fixed queue bound; :meth:`WorkerPool.submit` refuses work beyond it (the server answers
"busy" at once). Outcomes are handed back through one deque and a single loop wake-up per
burst, which keeps the thread hand-off cheap under load.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("statelink.workers")

#: outcome callback, run on the loop: (result, exception) with exactly one of them meaningful
Done = Callable[[Any, BaseException | None], None]

_STOP = object()


class PoolFull(Exception):
    """The pool's queue bound is reached; answer busy."""


class WorkerPool:
    """``size`` threads and at most ``max_queue`` jobs waiting for one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = 8, max_queue: int = 1024):
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.max_queue = max_queue
        self._loop = loop
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outcomes: deque[tuple[Done, Any, BaseException | None]] = deque()
        self._wake_pending = False
        self.pending = 0  #: jobs submitted and not yet delivered back (loop thread only)
        self.busy_threads = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"statelink-worker-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], done: Done
    ) -> None:
        """Queue ``fn(*args, **kwargs)``; ``done`` runs on the loop. Loop thread only."""
        if self.pending >= self.size + self.max_queue:
            raise PoolFull(f"worker queue full ({self.size} workers, {self.max_queue} queued)")
        self.pending += 1
        self._jobs.put((fn, args, kwargs, done))

    def _work(self) -> None:
        jobs, outcomes, loop = self._jobs, self._outcomes, self._loop
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            fn, args, kwargs, done = job
            try:
                outcomes.append((done, fn(*args, **kwargs), None))
            except BaseException as exc:
                outcomes.append((done, None, exc))
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # loop closed during shutdown: nobody is waiting
                    return

    def _drain(self) -> None:
        self._wake_pending = False
        outcomes = self._outcomes
        while outcomes:
            done, result, exc = outcomes.popleft()
            self.pending -= 1
            try:
                done(result, exc)
            except Exception:
                log.exception("outcome callback failed")

    def shutdown(self, wait: float = 0.0) -> None:
        """Stop the threads once they finish their current job (hung handlers are abandoned)."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait > 0:
            for thread in self._threads:
                thread.join(wait)
