"""One thread for many timers: client timeouts, workflow waits, retries and await timeouts.

Callbacks run on the scheduler thread and must be quick (post an event, resolve a future).

>>> import threading
>>> fired = threading.Event()
>>> with Scheduler() as scheduler:
...     _ = scheduler.call_later(0.01, fired.set)
...     fired.wait(2)
True
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("statelink.scheduler")


class Timer:
    """A scheduled call; :meth:`cancel` is cheap and thread-safe.

    A cancelled timer stays in its scheduler's heap (lazy removal) until it reaches the top, or
    until cancelled entries are more than half of the heap: then the heap is rebuilt without
    them (see :meth:`Scheduler._cancel`), so timers that are created and cancelled long before
    their deadline (every request's timeout, typically) cannot pile up.
    """

    __slots__ = ("args", "callback", "cancelled", "deadline", "scheduler")

    def __init__(self, deadline: float, callback: Callable[..., Any], args: tuple[Any, ...]):
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self.cancelled = False
        #: the scheduler whose heap holds this timer; None once it left the heap (fired,
        #: dropped or compacted away): set and cleared under that scheduler's lock
        self.scheduler: Scheduler | None = None

    def cancel(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:  # not (or no longer) in a heap: nothing to count
            self.cancelled = True
        else:
            scheduler._cancel(self)


#: heaps smaller than this are never compacted (lazy removal is as good there)
COMPACT_MIN = 64


class Scheduler:
    """A heap of timers served by one daemon thread, started on first use.

    The heap holds at most ``max(COMPACT_MIN, 2 * live + 1)`` entries: cancelled timers are
    counted, and once they are more than half of the heap it is rebuilt without them.
    """

    def __init__(self, name: str = "statelink-timers") -> None:
        self.name = name
        self._heap: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  #: cancelled timers still in the heap (under the lock)
        self._counter = itertools.count()
        self._lock = threading.Lock()  #: the condition's lock; ``with`` on it directly is cheaper
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the scheduler thread after ``delay`` seconds."""
        timer = Timer(time.monotonic() + max(0.0, delay), callback, args)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (timer.deadline, next(self._counter), timer))
            timer.scheduler = self
            if self._heap[0][2] is timer:
                self._cond.notify()
        return timer

    def _cancel(self, timer: Timer) -> None:
        """:meth:`Timer.cancel` of a timer in this heap: count it, compact when half is dead."""
        with self._lock:
            if timer.cancelled:
                return
            timer.cancelled = True
            if timer.scheduler is not self:  # it left the heap meanwhile (fired or dropped)
                return
            self._cancelled += 1
            heap = self._heap
            if self._cancelled > len(heap) >> 1 and len(heap) >= COMPACT_MIN:
                self._compact()

    def _compact(self) -> None:
        """Rebuild the heap without its cancelled timers (under the lock). In place: the
        scheduler thread holds a reference to the list. The earliest deadline can only move
        later, so the thread, if waiting, needs no wake-up (it re-checks when it wakes)."""
        heap = self._heap
        live = []
        for entry in heap:
            if entry[2].cancelled:
                entry[2].scheduler = None
            else:
                live.append(entry)
        heapq.heapify(live)
        heap[:] = live
        self._cancelled = 0

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while heap and heap[0][2].cancelled:
                        heapq.heappop(heap)[2].scheduler = None
                        self._cancelled -= 1
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        timer = heapq.heappop(heap)[2]
                        timer.scheduler = None
                        break
                    self._cond.wait(heap[0][0] - now if heap else None)
            try:
                timer.callback(*timer.args)
            except Exception:
                log.exception("timer callback failed")

    def close(self) -> None:
        """Stop the thread; pending timers never fire."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
