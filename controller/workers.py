"""A bounded pool of worker threads whose outcomes come back to an asyncio loop in batches.

Blocking handlers run here, never on the I/O thread. The pool has a fixed number of threads and
a fixed queue bound; :meth:`WorkerPool.submit` refuses work beyond it (the server answers
"busy" at once). Outcomes are handed back through one deque and a single loop wake-up per
burst, which keeps the thread hand-off cheap under load.

A job may carry a *gate*: the worker calls it just before the job and skips the job when it
returns False (the job's call was answered or withdrawn meanwhile, see
:meth:`controller.server.Call.hold`); ``done`` then gets :class:`NotStarted`.

:meth:`WorkerPool.shutdown` takes the jobs that have not started off the queue (they never
run) and gives each of them its one outcome, the ``error`` it is given; from then on
:meth:`~WorkerPool.submit` refuses work with :class:`PoolClosed`.
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


class NotStarted(Exception):
    """The job's gate said it is no longer wanted: it never ran."""


class PoolClosed(PoolFull):
    """The pool is shut down: it takes no more jobs (a :class:`PoolFull`, so callers that
    answer busy for a full queue answer busy for this too)."""


class WorkerPool:
    """``size`` threads and at most ``max_queue`` jobs waiting for one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = 8, max_queue: int = 1024):
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.max_queue = max_queue
        self.closed = False  #: shutdown() was called: submit() refuses, nothing queued runs
        self._limit = size + max_queue  #: submit() refuses at this many pending (-1: closed)
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
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        done: Done,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        """Queue ``fn(*args, **kwargs)``; ``done`` runs on the loop. Loop thread only.

        ``gate()``, if given, runs on the worker just before ``fn``: False skips ``fn`` (``done``
        gets :class:`NotStarted`)."""
        if self.pending >= self._limit:
            if self.closed:
                raise PoolClosed("the worker pool is shut down")
            raise PoolFull(f"worker queue full ({self.size} workers, {self.max_queue} queued)")
        self.pending += 1
        self._jobs.put((fn, args, kwargs, done, gate))

    def _work(self) -> None:
        jobs, outcomes, loop = self._jobs, self._outcomes, self._loop
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            fn, args, kwargs, done, gate = job
            if gate is not None and not gate():
                outcomes.append((done, None, NotStarted("the job was no longer wanted")))
            else:
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

    def shutdown(self, wait: float = 0.0, error: BaseException | None = None) -> int:
        """Stop the pool: refuse new jobs, take every job that has not started off the queue
        (it never runs), and stop the threads once they finish their current job (hung
        handlers are abandoned). Returns how many jobs were taken off. Idempotent. Call it on
        the loop thread while the loop runs (as the server does), so that no :meth:`submit`
        races with it and the outcomes run where they always run.

        Each job taken off still gets exactly one outcome: its ``done`` is called with
        ``(None, error)`` (default: :class:`PoolClosed`). Called on the loop thread, that
        happens before this returns; from another thread, through the loop (or in this thread
        if the loop is closed, when nothing else can run a callback any more).
        """
        self.closed = True
        self._limit = -1  # submit() refuses from now on, at no cost to its usual path
        if error is None:
            error = PoolClosed("the worker pool was shut down before the job started")
        jobs, taken = self._jobs, 0
        while True:  # drain before the STOP markers, so nothing queued runs after them
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:  # a second shutdown(): the markers are (re)put below
                continue
            self._outcomes.append((job[3], None, error))
            taken += 1
        for _ in self._threads:
            jobs.put(_STOP)
        if taken:
            self._deliver()
        if wait > 0:
            for thread in self._threads:
                thread.join(wait)
        return taken

    def _deliver(self) -> None:
        """Run the queued outcomes: now on the loop thread (or a closed loop's), else via it."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop or self._loop.is_closed():
            self._drain()
            return
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # closed meanwhile: nothing else runs callbacks now
            self._drain()
